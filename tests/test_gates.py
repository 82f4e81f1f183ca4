"""Gate parsing and evaluation."""

import pytest

from maverick_quant.errors import InputError
from maverick_quant.validation.gates import (Gate, GateResult, ReportShape, check_baseline, check_gate_keys,
                                             evaluate_gates, flatten, parse_gate)

REPORT = {
    "reference": {"ppl": 5.0, "nll": 1.6},
    "candidate": {"ppl": 5.2, "nll": 1.65},
    "ppl_ratio": 1.04,
    "kl": {"mean": 0.04, "median": 0.02, "p90": 0.08, "p99": 0.3, "max": 2.0},
    "top1_agreement": 0.93,
    "tokens": 1000,
    "hellaswag": {"delta": -0.5},
    "protocol": {"name": "gptq", "ctx": 2048},
    "candidate_model": "out/bundle",
    "layers": [{"layer": 0, "rel_error": 0.01}],
    "flag": True,
}
BASELINE = {"kl": {"mean": 0.05, "p99": 0.3}, "candidate": {"ppl": 5.0}}


@pytest.mark.parametrize(
    "text, key, op, value, baseline_op",
    [
        ("ppl_ratio<=1.05", "ppl_ratio", "<=", 1.05, None),
        ("kl.mean<=0.05", "kl.mean", "<=", 0.05, None),
        ("top1_agreement>=0.9", "top1_agreement", ">=", 0.9, None),
        ("hellaswag.delta>=-1.0", "hellaswag.delta", ">=", -1.0, None),
        ("  kl.mean <= baseline * 1.1 ", "kl.mean", "<=", 1.1, "*"),
        ("candidate.ppl<baseline+0.5", "candidate.ppl", "<", 0.5, "+"),
        ("candidate.ppl>baseline-0.5", "candidate.ppl", ">", 0.5, "-"),
        ("kl.p99<=baseline", "kl.p99", "<=", 1.0, "*"),
        ("tokens==1000", "tokens", "==", 1000.0, None),
        ("kl.max<5e-1", "kl.max", "<", 0.5, None),
    ],
)
def test_parse_gate_forms(text, key, op, value, baseline_op):
    gate = parse_gate(text)
    assert gate == Gate(text.strip(), key, op, value, baseline_op)
    assert gate.uses_baseline is (baseline_op is not None)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "ppl_ratio", "ppl_ratio<=", "<=1.05", "ppl_ratio=>1.05", "ppl_ratio=1.05", "ppl_ratio<==1",
     "ppl_ratio<=abc", "ppl_ratio<=baseline/2", "ppl_ratio<=baseline*", "ppl_ratio<=baseline*-1",
     "ppl_ratio<=1.05 extra", "ppl_ratio<=nan", "ppl_ratio<=inf", "kl..mean<=1", "1kl<=1", "ppl ratio<=1",
     "kl.mean<=baseline*1e999", "kl.mean<=baseline+1e999"],
)
def test_bad_gate_raises_input_error_naming_expression_and_form(text):
    with pytest.raises(InputError) as info:
        parse_gate(text)
    message = str(info.value)
    assert repr(text.strip() if text.strip() else text) in message or repr(text) in message
    assert "KEY OP THRESHOLD" in message


def test_flatten_keeps_numeric_leaves_under_dotted_keys():
    flat = flatten(REPORT)
    assert flat["kl.mean"] == 0.04
    assert flat["protocol.ctx"] == 2048.0
    assert flat["tokens"] == 1000.0
    assert "protocol.name" not in flat and "candidate_model" not in flat
    assert "flag" not in flat and not any(key.startswith("layers") for key in flat)


def _evaluate(*texts, baseline=None):
    return evaluate_gates([parse_gate(t) for t in texts], REPORT, baseline)


def test_number_gates_pass_and_fail():
    results = _evaluate("ppl_ratio<=1.05", "ppl_ratio<1.04", "top1_agreement>=0.95", "tokens==1000",
                        "kl.mean>0.04", "hellaswag.delta>=-1.0")
    assert [r.passed for r in results] == [True, False, False, True, False, True]
    assert results[0] == GateResult("ppl_ratio<=1.05", "ppl_ratio", 1.04, 1.05, True)


def test_baseline_gates_compute_threshold_from_baseline():
    results = _evaluate("kl.mean<=baseline*1.1", "candidate.ppl<baseline+0.5", "candidate.ppl<baseline-0.5",
                        "kl.p99<=baseline", baseline=BASELINE)
    assert [r.threshold for r in results] == pytest.approx([0.055, 5.5, 4.5, 0.3])
    assert [r.actual for r in results] == pytest.approx([0.04, 5.2, 5.2, 0.3])
    assert [r.passed for r in results] == [True, True, False, True]


def test_nan_actual_fails():
    results = evaluate_gates([parse_gate("kl.mean<=1")], {"kl": {"mean": float("nan")}}, None)
    assert results[0].passed is False


def test_missing_key_names_key_and_lists_available():
    with pytest.raises(InputError) as info:
        _evaluate("kl.mean<=0.05", "kl.p95<=0.1")
    message = str(info.value)
    assert "'kl.p95'" in message and "kl.p99" in message and "top1_agreement" in message


def test_baseline_gate_without_baseline():
    with pytest.raises(InputError, match="no baseline"):
        _evaluate("kl.mean<=baseline*1.1")


def test_baseline_lacking_key():
    with pytest.raises(InputError, match="'top1_agreement'.*baseline report"):
        _evaluate("top1_agreement>=baseline-0.01", baseline=BASELINE)


def test_baseline_problems_are_found_before_any_report_exists():
    gates = [parse_gate("ppl_ratio<=1.05"), parse_gate("top1_agreement>=baseline-0.01")]
    with pytest.raises(InputError, match="no baseline"):
        check_baseline(gates, None)
    with pytest.raises(InputError, match="'top1_agreement'.*baseline report"):
        check_baseline(gates, BASELINE)
    check_baseline([parse_gate("kl.mean<=baseline*1.1"), gates[0]], BASELINE)
    check_baseline(gates[:1], None)


def test_no_gates_and_unused_baseline():
    assert evaluate_gates([], REPORT, None) == []
    assert _evaluate("ppl_ratio<=1.05", baseline={})[0].passed


@pytest.mark.parametrize("content,message", [(b"\xff\xfe\x00binary", "utf-8"), (b"[1, 2]", "expected a JSON object, got list"),
                                             (b"{", "Expecting")])
def test_a_baseline_that_is_not_a_json_object_is_refused_naming_it(tmp_path, content: bytes, message: str) -> None:
    """Random bytes or a JSON list as --baseline (or --coverage) were tracebacks (exit 3)."""
    from maverick_quant.errors import InputError
    from maverick_quant.checkpoint import load_json_object

    path = tmp_path / "report.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=rf"report.json: cannot read baseline report \(.*{message}"):
        load_json_object(path, "baseline report")


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN"])
def test_a_baseline_number_that_is_not_finite_is_refused_before_any_work(value: str) -> None:
    """A baseline kl.mean of Infinity made kl.mean<=baseline*1.1 an infinite threshold: any
    candidate passed."""
    with pytest.raises(InputError, match=rf"the baseline report's kl.mean is {value.lower().replace('infinity', 'inf')}"):
        check_baseline([parse_gate("kl.mean<=baseline*1.1")], {"kl": {"mean": value}})


@pytest.mark.parametrize("key,shape,reason", [
    ("multiple_choice.candidate.acc", ReportShape(text=True), "only with --choices"),
    ("hellaswag.delta", ReportShape(text=True, choices=True), "only with --hellaswag"),
    ("vision.rel_error.max", ReportShape(text=True, moe=True), "only with --mmproj"),
    ("experts.rel_error.max", ReportShape(text=True), "only for a mixture-of-experts model"),
    ("routing.agreement.mean", ReportShape(text=True, moe=True, gguf=True), "not for a GGUF candidate"),
    ("routing.agreement.min", ReportShape(text=True, moe=True, kernels=True), "not with kernels"),
    ("experts.rel_error.max", ReportShape(text=False, moe=True, hellaswag=True), "only with --data"),
])
def test_a_section_the_run_will_not_make_is_refused_before_any_work(key: str, shape: ReportShape, reason: str) -> None:
    """Such gates used to pass the up-front check and fail after the whole evaluation (a
    `choices.*` gate could never be satisfied: the report's section is multiple_choice)."""
    with pytest.raises(InputError, match=rf"gate '{key}<=1': the report has {key.split('.')[0]} numbers {reason}"):
        check_gate_keys([parse_gate(f"{key}<=1")], shape)


def test_sections_the_run_makes_are_accepted() -> None:
    shape = ReportShape(text=True, hellaswag=True, choices=True, moe=True, kernels=True, vision=True)
    check_gate_keys([parse_gate(f"{key}>=0") for key in ("multiple_choice.candidate.acc", "hellaswag.delta",
                                                         "vision.rel_error.max", "experts.fallbacks",
                                                         "experts.rel_error.max")], shape)  # kernels: still measured
    check_gate_keys([parse_gate("experts.rel_error.max<=1"), parse_gate("routing.agreement.mean>=0.9")],
                    ReportShape(text=True, moe=True))


def test_a_vision_key_the_section_never_holds_is_refused_before_any_work() -> None:
    """The vision section's numbers are fixed; a misspelt one passed the check and failed after
    the whole text evaluation."""
    shape = ReportShape(text=True, moe=True, gguf=True, vision=True)
    check_gate_keys([parse_gate("vision.rel_error.max<=0.005"), parse_gate("vision.images>=8")], shape)
    with pytest.raises(InputError, match=r"no number 'vision.rel_eror.max'; expected one of vision.images"):
        check_gate_keys([parse_gate("vision.rel_eror.max<=0.005")], shape)
