"""`validate --resume`: a validation killed mid-run goes on from its last finished layer and
writes the report an uninterrupted run writes (validation/progress.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from maverick_quant.cli import cli
from maverick_quant.resume import state_dir_for, work_dir_for
from tests.test_resume import _kill_during_write, _spawn

LENGTH = 24


@pytest.fixture(scope="module")
def candidate(tiny_llama4_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validate-resume") / "rtn"
    result = CliRunner().invoke(cli, ["quantize", str(tiny_llama4_dir), "--method", "rtn", "--group-size", "32",
                                      "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def _args(model: Path, candidate: Path, text: Path, report: Path, *extra: str) -> list[str]:
    return ["validate", "--reference", str(model), "--candidate", str(candidate), "--data", str(text),
            "--ctx", str(LENGTH), "--max-windows", "4", "--report", str(report), "--no-progress", *extra]


def _numbers(report: Path) -> dict:
    """report.json without what differs between runs (timings, peak memory, paths)."""
    data = json.loads((report / "report.json").read_text())
    return {k: v for k, v in data.items() if k not in ("seconds", "resources", "candidate_model", "reference_model")}


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


@pytest.mark.slow
def test_killed_validation_resumes_at_its_next_layer_and_reports_as_an_uninterrupted_run(
        tiny_llama4_dir: Path, candidate: Path, small_text_file: Path, tmp_path: Path) -> None:
    """SIGKILL inside the 3rd atomic tensor write (the hidden states entering layer 3): the
    rerun without --resume is refused, one with other inputs is refused naming them, and
    --resume finishes with the numbers of an uninterrupted run, running layer 2 onwards only."""
    whole, report = tmp_path / "whole", tmp_path / "report"
    assert _invoke(_args(tiny_llama4_dir, candidate, small_text_file, whole)).exit_code == 0
    args = _args(tiny_llama4_dir, candidate, small_text_file, report)
    _kill_during_write(args, 3)
    state = state_dir_for(report)
    progress = json.loads((state / "layers.json").read_text())
    assert progress["next_layer"] == 2 and len(progress["steps"]) == 2 and not report.exists()

    refused = _invoke(args)
    assert refused.exit_code == 2 and "pass --resume to continue it" in refused.output
    changed = _invoke(_args(tiny_llama4_dir, candidate, small_text_file, report, "--batch", "2", "--resume"))
    assert changed.exit_code == 2 and "settings.batch (4 -> 2)" in changed.output

    process = _spawn([*args[:-1], "--progress", "--resume"])  # the bar shows where it went on
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert "2/4" in output and "0/4" not in output
    assert _numbers(report) == _numbers(whole)
    assert not state.exists() and not work_dir_for(report).exists()


def test_a_gate_on_a_missing_key_keeps_the_finished_evaluation_for_resume(
        tiny_llama4_dir: Path, candidate: Path, small_text_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    early = _invoke(_args(tiny_llama4_dir, candidate, small_text_file, report, "--gate", "kl.maen<=1"))
    assert early.exit_code == 2 and "will hold no number 'kl.maen'" in early.output, early.output  # before any work
    assert not state_dir_for(report).exists()
    # a key inside a section whose contents depend on the run is found only in the report
    typo = _invoke(_args(tiny_llama4_dir, candidate, small_text_file, report, "--gate", "experts.rel_errr.max<=1"))
    assert (typo.exit_code == 2 and "no number 'experts.rel_errr.max'" in typo.output
            and "rerun with the gates corrected and --resume" in typo.output), typo.output
    state = state_dir_for(report)
    assert (state / "evaluation.json").is_file() and not report.exists()
    (state / "layers-00004.safetensors").unlink()  # the evaluation is read back, not recomputed from the layers
    fixed = _invoke(_args(tiny_llama4_dir, candidate, small_text_file, report, "--gate", "kl.mean<=1", "--resume"))
    assert fixed.exit_code == 0, fixed.output
    assert json.loads((report / "report.json").read_text())["gates"][0]["passed"]
    assert "expert_error.png" in (report / "report.md").read_text() and not state.exists()


@pytest.mark.parametrize("content, extra, named", [
    ('{"context": "The harbour", "choices": ["a", "b"]}\n', (), "bad.jsonl"),  # no label
    ("\n\n", (), "bad.jsonl: no tasks"),
    ('{"context": "The harbour", "choices": ["a", "b"], "label": 0}\n', ("--hellaswag-tasks", "0"), "--hellaswag-tasks"),
    ('{"context": "The harbour", "choices": ["a", "b"], "label": 0}\n', ("--gate", "kl.mean<=baseline*1.1"),
     "no baseline report was given"),
])
def test_a_malformed_benchmark_file_is_refused_before_any_layer(tiny_llama4_dir: Path, candidate: Path,
                                                                 small_text_file: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, content: str,
                                                                 extra: tuple[str, ...], named: str) -> None:
    import maverick_quant.validation.evaluate as evaluate_module

    def evaluated(*args, **kwargs):
        raise AssertionError("the evaluation ran before the benchmark file was read")

    monkeypatch.setattr(evaluate_module, "evaluate", evaluated)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    report = tmp_path / "report"
    result = _invoke(_args(tiny_llama4_dir, candidate, small_text_file, report, "--choices", str(bad), *extra))
    assert result.exit_code == 2 and named in result.output, result.output
    assert not report.exists() and not state_dir_for(report).exists()


def test_a_gguf_replaced_beside_its_old_sidecar_is_another_artifact(tmp_path) -> None:
    """`export --force --mmproj` replaces the GGUF minutes before it rewrites the sidecar
    manifest; a kill between leaves the old sidecar beside the new file, which a resumed
    validation must not take for the file it evaluated."""
    from maverick_quant.validation.progress import artifact_fingerprint

    gguf, sidecar = tmp_path / "m.gguf", tmp_path / "m.gguf.manifest.json"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    sidecar.write_text('{"files": {"m.gguf": {"bytes": 2564}}}')
    before = artifact_fingerprint(gguf)
    assert artifact_fingerprint(gguf) == before
    gguf.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 10)  # same size, other tensors
    assert artifact_fingerprint(gguf) != before


def test_a_split_gguf_is_fingerprinted_by_every_shard(tmp_path) -> None:
    """llama.cpp loads a split GGUF whole: replacing its second shard makes it another artifact,
    and a missing shard is named."""
    from maverick_quant.errors import InputError
    from maverick_quant.validation.progress import artifact_fingerprint

    first, second = (tmp_path / f"m-0000{k}-of-00002.gguf" for k in (1, 2))
    first.write_bytes(b"GGUF" + bytes(1000))
    second.write_bytes(bytes(range(256)) * 8)
    before = artifact_fingerprint(first)
    second.write_bytes(bytes(range(255, -1, -1)) * 8)
    assert artifact_fingerprint(first) != before
    second.unlink()
    with pytest.raises(InputError, match="m-00001-of-00002.gguf: a split GGUF of 2 files, m-00002-of-00002.gguf missing"):
        artifact_fingerprint(first)
