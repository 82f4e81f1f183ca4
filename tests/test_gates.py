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


MEASURED_ON = {"reference_fingerprint": "ref-a",
               "protocol": {"name": "gptq", "ctx": 512, "windows": 40, "first_scored_position": 256,
                            "windows_sha256": "w-a"},
               "hellaswag": {"tasks": 400, "sha256": "h-a"}}


def _measured_on(**changes) -> dict:
    """MEASURED_ON with dotted facts replaced ({"protocol.ctx": 1024} or {"hellaswag": None} to drop a section)."""
    import copy

    facts = copy.deepcopy(MEASURED_ON)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        holder = facts
        for part in parents:
            holder = holder[part]
        if value is None:
            del holder[leaf]
        else:
            holder[leaf] = value
    return facts


@pytest.mark.parametrize("fact,value", [("protocol__windows_sha256", "w-b"), ("protocol__ctx", 1024),
                                        ("protocol__windows", 20), ("protocol__first_scored_position", 0),
                                        ("protocol__name", "llama.cpp"), ("reference_fingerprint", "ref-b")])
def test_a_text_gate_refuses_a_baseline_measured_on_other_windows_or_another_reference(fact: str, value) -> None:
    """A baseline measured on other text (another --max-windows, ctx, data file or protocol)
    or against another reference gave the gate another measurement's number to pass under."""
    from maverick_quant.validation.gates import check_comparable

    baseline = {**_measured_on(**{fact: value}), "kl": {"mean": 0.05}}
    dotted = fact.replace("__", ".")
    with pytest.raises(InputError, match=rf"kl.mean<=baseline\*1.1.*measured with {dotted} = {value!r}"):
        check_comparable([parse_gate("kl.mean<=baseline*1.1")], MEASURED_ON, baseline)
    assert check_comparable([parse_gate("kl.mean<=0.1")], MEASURED_ON, baseline) == []  # a fixed threshold: nothing to compare


def test_each_gate_checks_only_what_its_number_was_measured_on() -> None:
    from maverick_quant.validation.gates import check_comparable

    other_tasks = _measured_on(hellaswag__tasks=100)
    check_comparable([parse_gate("kl.mean<=baseline*1.1")], MEASURED_ON, other_tasks)  # text numbers: tasks do not matter
    with pytest.raises(InputError, match="hellaswag.tasks = 100"):
        check_comparable([parse_gate("hellaswag.delta>=baseline-1")], MEASURED_ON, other_tasks)
    other_text = _measured_on(protocol__windows_sha256="w-b")
    check_comparable([parse_gate("hellaswag.delta>=baseline-1"), parse_gate("seconds<=baseline*2")], MEASURED_ON,
                     other_text)
    with pytest.raises(InputError, match="protocol.windows_sha256"):  # measured on the text, layer by layer
        check_comparable([parse_gate("experts.rel_error.max<=baseline*1.2")], MEASURED_ON, other_text)
    with pytest.raises(InputError, match="reference_fingerprint"):  # every number is against the reference
        check_comparable([parse_gate("seconds<=baseline*2")], MEASURED_ON, _measured_on(reference_fingerprint="ref-b"))


def test_an_older_baseline_is_checked_on_what_it_records_and_the_rest_is_named() -> None:
    from maverick_quant.validation.gates import check_comparable

    older = {"protocol": {"name": "gptq", "ctx": 512, "windows": 40, "first_scored_position": 256}, "kl": {"mean": 0.05}}
    gates = [parse_gate("kl.mean<=baseline*1.1"), parse_gate("kl.p99<=baseline*1.1")]
    assert check_comparable(gates, MEASURED_ON, older) == ["reference_fingerprint", "protocol.windows_sha256"]
    with pytest.raises(InputError, match="protocol.ctx = 2048"):
        check_comparable(gates, MEASURED_ON, {**older, "protocol": {**older["protocol"], "ctx": 2048}})
    # what this run does not know yet (a recipe's self-written text) is checked later, on the report
    assert check_comparable(gates, {"reference_fingerprint": "ref-a"}, _measured_on(protocol__ctx=2048)) == []
    with pytest.raises(InputError, match="protocol.ctx = 2048"):
        evaluate_gates(gates, {**MEASURED_ON, "kl": {"mean": 0.04, "p99": 0.1}},
                       {**_measured_on(protocol__ctx=2048), "kl": {"mean": 0.05, "p99": 0.3}})
