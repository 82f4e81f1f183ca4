"""report.json, report.md and the PNG plots."""

import json
from pathlib import Path

import pytest
import torch

from maverick_quant.errors import InputError
from maverick_quant.validation.gates import evaluate_gates, parse_gate
from maverick_quant.validation.report import PNG_SIGNATURE, write_report

REQUIRED = ("reference.ppl", "candidate.ppl", "ppl_ratio", "kl.mean", "kl.p99", "top1_agreement", "tokens")


def _report():
    return {
        "reference": {"ppl": 5.4721, "nll": 1.6997},
        "candidate": {"ppl": 5.6113, "nll": 1.7248},
        "ppl_ratio": 1.02544,
        "kl": {"mean": 0.01234, "median": 0.005, "p90": 0.03, "p99": 0.2345, "max": 1.5},
        "top1_agreement": 0.9341,
        "tokens": 12345,
        "protocol": {"name": "gptq", "ctx": 2048, "windows": 7, "data": "wiki.txt"},
        "reference_model": "models/llama-tiny",
        "candidate_model": "out/bundle",
        "layers": [{"layer": 0, "rel_error": 0.01}, {"layer": 1, "rel_error": 0.03}],
    }


def _get(report, dotted):
    for part in dotted.split("."):
        report = report[part]
    return report


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report = _report()
    results = evaluate_gates([parse_gate("ppl_ratio<=1.05"), parse_gate("kl.p99<=0.1")], report, None)
    report["gates"] = [{"gate": r.gate, "actual": r.actual, "threshold": r.threshold, "passed": r.passed}
                       for r in results]
    kl = torch.rand(500, generator=torch.Generator().manual_seed(0)).pow(4)
    paths = write_report(report, out, kl_values=kl, layer_errors=[("layer 0", 0.01), ("layer 1", 0.03)],
                         gate_results=results)
    return out, report, paths


def test_files_written_and_returned(written):
    out, _, paths = written
    names = {"report.json", "report.md", "kl_histogram.png", "layer_error.png"}
    assert {p.name for p in paths} == names
    assert all(Path(p).parent == out and Path(p).is_file() for p in paths)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left behind


def test_json_loads_back_with_required_keys(written):
    out, report, _ = written
    text = (out / "report.json").read_text()
    loaded = json.loads(text)
    assert loaded == report
    for key in REQUIRED:
        assert _get(loaded, key) == _get(report, key)
    assert text == json.dumps(report, indent=2, sort_keys=True) + "\n"


def test_markdown_has_numbers_gates_and_run_info(written):
    md = (written[0] / "report.md").read_text()
    for number in ("5.4721", "5.6113", "+2.54%", "0.01234", "0.2345", "0.9341", "12,345"):
        assert number in md
    assert "| metric | reference | candidate | change |" in md
    assert "`ppl_ratio<=1.05` | 1.02544 | 1.05 | PASS" in md
    assert "`kl.p99<=0.1` | 0.2345 | 0.1 | FAIL" in md
    assert "1 of 2 gates FAILED" in md
    assert "- protocol.ctx: 2,048" in md and "- candidate_model: out/bundle" in md
    assert "layer 1 (0.03)" in md
    assert "(kl_histogram.png)" in md and "(layer_error.png)" in md


def test_pngs_have_signature(written):
    out = written[0]
    for name in ("kl_histogram.png", "layer_error.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE


def test_minimal_report_without_plots_or_gates(tmp_path):
    report = {key: value for key, value in _report().items() if key not in ("protocol", "layers")}
    paths = write_report(report, tmp_path / "new")
    assert [p.name for p in paths] == ["report.json", "report.md"]
    md = paths[1].read_text()
    assert "No gates were given." in md and ".png" not in md
    assert json.loads(paths[0].read_text()) == report


def test_gates_section_from_report_dict_when_no_results_given(tmp_path):
    report = {**_report(), "gates": [{"gate": "tokens>=10", "actual": 12345, "threshold": 10.0, "passed": True}]}
    md = write_report(report, tmp_path)[-1].read_text()
    assert "All 1 gates passed" in md and "`tokens>=10` | 12,345 | 10.0 | PASS" in md
    close = {**_report(), "gates": [{"gate": "ppl_ratio<=1.05", "actual": 1.0500004, "threshold": 1.05, "passed": False}]}
    md = write_report(close, tmp_path / "close")[-1].read_text()
    assert "`ppl_ratio<=1.05` | 1.0500004 | 1.05 | FAIL" in md  # a narrow FAIL never reads as two equal numbers


def test_a_broken_candidates_report_is_strict_json_and_still_fails_its_gates(tmp_path):
    """NaN and infinities are written as the strings "NaN" / "Infinity" (strict parsers refuse a
    bare NaN, and jq reads it as null, which compares below every number); a gate on such a
    report still fails, and read back as a baseline it is refused."""
    nan, inf = float("nan"), float("inf")
    report = {**_report(), "ppl_ratio": inf, "kl": {"mean": nan, "median": nan, "p90": nan, "p99": nan, "max": nan},
              "layers": [{"layer": 0, "rel_error": torch.tensor(nan)}]}
    text = write_report(report, tmp_path)[0].read_text()

    def refuse_constant(name):
        raise ValueError(f"not strict JSON: {name}")

    written = json.loads(text, parse_constant=refuse_constant)
    assert written["ppl_ratio"] == "Infinity" and written["kl"]["mean"] == "NaN"
    assert written["layers"][0]["rel_error"] == "NaN"
    results = evaluate_gates([parse_gate("ppl_ratio<=1.05"), parse_gate("kl.p99<=1")], written)
    assert not any(result.passed for result in results)
    with pytest.raises(InputError, match="the baseline report's kl.p99 is nan"):  # as a baseline: refused outright
        evaluate_gates([parse_gate("kl.p99<=baseline*1.1")], written, written)


def test_a_path_that_is_not_utf8_is_written_escaped_not_a_crash_at_the_end(tmp_path):
    """`--data $'dat\\xff.txt'` reaches Python as a surrogate: report.md's encode raised after
    the whole evaluation (exit 3)."""
    report = {**_report(), "protocol": {**_report()["protocol"], "data": "dat\udcff.txt"}}
    paths = write_report(report, tmp_path / "r")
    assert "dat\\udcff.txt" in paths[-1].read_text() and json.loads(paths[0].read_text())["protocol"]["data"] == "dat\udcff.txt"
