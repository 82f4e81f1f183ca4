"""`maverick-quant imatrix`: llama.cpp's importance-matrix GGUF from our calibration set,
checked against statistics taken independently from transformers' own forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from maverick_quant.calibration.data import CalibrationSet
from maverick_quant.cli import cli
from maverick_quant.exporters.gguf import EXPERT_NAMES, LAYER_NAMES
from maverick_quant.streaming import open_source
from tests.test_moe_quantize import _text

SAMPLES, LENGTH = 4, 40


def run(*args) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def read_imatrix(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}


def hf_statistics(model_dir: Path, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """From transformers' whole-model forward: layer 0's q_proj input sum of squares, and layer
    1's MoE input x with its router logits (for the routed experts' statistics)."""
    from transformers import Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = model.language_model.model.layers
    seen = {"q_sum2": torch.zeros(layers[0].self_attn.q_proj.in_features, dtype=torch.float64), "x": [], "logits": []}
    hooks = [layers[0].self_attn.q_proj.register_forward_pre_hook(
                 lambda _m, a: seen.__setitem__("q_sum2", seen["q_sum2"] + a[0].reshape(-1, a[0].shape[-1]).double().square().sum(0))),
             layers[1].feed_forward.register_forward_pre_hook(lambda _m, a: seen["x"].append(a[0].reshape(-1, a[0].shape[-1])))]
    with torch.no_grad():
        for window in input_ids:
            model(input_ids=window[None])
    for hook in hooks:
        hook.remove()
    x = torch.cat(seen["x"])
    return {"q_sum2": seen["q_sum2"], "x": x, "logits": x @ layers[1].feed_forward.router.weight.detach().T}


def test_imatrix_holds_every_quantized_linear_with_transformers_statistics(tiny_llama4_dir: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    run("calibrate", tiny_llama4_dir, "--data", _text(tmp_path, "wiki.valid.tokens"), "--samples", SAMPLES,
        "--seq-len", LENGTH, "--out", calib, "--no-progress")
    out = tmp_path / "model.imatrix.gguf"
    run("imatrix", tiny_llama4_dir, "--calib", calib, "--out", out, "--no-progress")
    fields, tensors = read_imatrix(out)
    assert fields["general.type"] == "imatrix"
    assert fields["imatrix.chunk_count"] == SAMPLES and fields["imatrix.chunk_size"] == LENGTH
    assert "wiki.valid.tokens" in fields["imatrix.datasets"][0]

    source = open_source(tiny_llama4_dir)
    expected_names = set()
    for index in range(4):
        plan = source.table.plan(source.table.text_config(source.config), index)
        names = [LAYER_NAMES[n] for n in plan.linears] + (list(EXPERT_NAMES.values()) if plan.moe else [])
        expected_names |= {f"blk.{index}.{n}.weight.{part}" for n in names for part in ("in_sum2", "counts")}
    assert set(tensors) == expected_names

    tokens = SAMPLES * LENGTH
    stats = hf_statistics(tiny_llama4_dir, CalibrationSet.load(calib).input_ids)
    assert tensors["blk.0.attn_q.weight.counts"].tolist() == [[tokens]]
    np.testing.assert_allclose(tensors["blk.0.attn_q.weight.in_sum2"][0], stats["q_sum2"].numpy(), rtol=1e-4)

    experts = tensors["blk.1.ffn_gate_exps.weight.in_sum2"].shape[0]
    top_value, choice = stats["logits"].topk(1, dim=1)
    counts = torch.bincount(choice[:, 0], minlength=experts)
    assert tensors["blk.1.ffn_gate_exps.weight.counts"][:, 0].tolist() == counts.tolist()
    assert counts.sum() == tokens and counts.min() < counts.max()  # every token routed once, unevenly
    routed = stats["x"] * torch.sigmoid(top_value)  # Llama 4: the score scales the expert's input
    expected = torch.stack([routed[choice[:, 0] == e].double().square().sum(0) for e in range(experts)])
    np.testing.assert_allclose(tensors["blk.1.ffn_gate_exps.weight.in_sum2"], expected.numpy(), rtol=1e-4, atol=1e-6)
    assert np.array_equal(tensors["blk.1.ffn_up_exps.weight.in_sum2"], tensors["blk.1.ffn_gate_exps.weight.in_sum2"])
    assert np.array_equal(tensors["blk.1.ffn_down_exps.weight.counts"], tensors["blk.1.ffn_gate_exps.weight.counts"])

    result = CliRunner().invoke(cli, ["imatrix", str(tiny_llama4_dir), "--calib", str(calib), "--out", str(out)])
    assert result.exit_code == 2 and "--force" in result.output


def test_imatrix_needs_calibration_data(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["imatrix", str(tiny_llama_dir), "--out", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "--data" in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_activations_that_overflow_are_refused_not_written_into_the_imatrix(tiny_llama_dir: Path, small_text_file: Path,
                                                                             tmp_path: Path) -> None:
    """Layer 1's gate/up x 1e21 (finite weights) overflow fp32: the imatrix held NaN/Inf square
    sums for every later linear, which llama-quantize would read, and exited 0."""
    import shutil

    from tests.test_checkpoint import _rewrite_tensor, _tensor

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        _rewrite_tensor(model, name, _tensor(model, name) * 1e21)
    result = CliRunner().invoke(cli, ["imatrix", str(model), "--data", str(small_text_file), "--samples", 2, "--seq-len",
                                      16, "--out", str(tmp_path / "x.gguf"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "the hidden states became NaN/Inf at the output of layer 1" in result.output
    assert "(in layer 1); the finished layer 0 is kept" in result.output and not (tmp_path / "x.gguf").exists()


def test_imatrix_refuses_a_directory_as_output(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["imatrix", str(tiny_llama_dir), "--data", "self", "--out", str(tmp_path), "--force"])
    assert result.exit_code == 2 and "is a directory" in result.output


def test_a_killed_imatrix_or_coverage_run_resumes_to_the_same_output(tiny_llama4_dir: Path, tmp_path: Path) -> None:
    """SIGKILLed inside an atomic write (the hidden states entering layer 2, after layer 1's
    sums), the run leaves its finished layers beside the output and no output; without
    --resume or with other inputs it is refused, naming why; --resume finishes it, reading
    layers 0-1 back, and the GGUF equals an uninterrupted run's byte for byte. The same for
    `calibrate --coverage` (killed entering layer 2), whose coverage.json equals an
    uninterrupted run's."""
    from tests.test_resume import _kill_during_write

    from maverick_quant.resume import state_dir_for

    calib, other = tmp_path / "calib", tmp_path / "other"
    text = _text(tmp_path, "wiki.valid.tokens")
    for folder, seed in ((calib, 0), (other, 1)):
        run("calibrate", tiny_llama4_dir, "--data", text, "--samples", SAMPLES, "--seq-len", LENGTH, "--seed", seed,
            "--out", folder, "--no-progress")
    whole, resumed = tmp_path / "whole.gguf", tmp_path / "resumed.gguf"
    run("imatrix", tiny_llama4_dir, "--calib", calib, "--out", whole, "--no-progress")
    args = ["imatrix", str(tiny_llama4_dir), "--calib", str(calib), "--out", str(resumed), "--no-progress"]
    _kill_during_write(args, 4)  # results 0, hidden 1, results 1, then the hidden states entering layer 2
    state = state_dir_for(resumed)
    assert not resumed.exists() and sorted(p.name for p in (state / "results").iterdir()) == [
        "layer-00000.safetensors", "layer-00001.safetensors"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2 and "--resume" in refused.output
    changed = CliRunner().invoke(cli, [*args[:3], str(other), *args[4:], "--resume"])
    assert changed.exit_code == 2 and "calibration_sha256" in changed.output and state.is_dir()
    run(*args, "--resume")
    assert resumed.read_bytes() == whole.read_bytes() and not state.exists()

    coverage_args = lambda out: ["calibrate", str(tiny_llama4_dir), "--data", str(text), "--samples", str(SAMPLES),  # noqa: E731
                                 "--seq-len", str(LENGTH), "--coverage", "--out", str(out), "--no-progress"]
    run(*coverage_args(tmp_path / "cov-whole"))
    _kill_during_write(coverage_args(tmp_path / "cov"), 5)  # calibration, results 0, hidden 1, results 1, hidden 2
    assert not (tmp_path / "cov").exists() and (state_dir_for(tmp_path / "cov") / "results").is_dir()
    run(*coverage_args(tmp_path / "cov"), "--resume")
    assert ((tmp_path / "cov" / "coverage.json").read_text() == (tmp_path / "cov-whole" / "coverage.json").read_text())
    assert not state_dir_for(tmp_path / "cov").exists()
    alone = CliRunner().invoke(cli, ["calibrate", str(tiny_llama4_dir), "--data", str(text), "--out", str(tmp_path / "cov2"),
                                     "--resume"])  # no --coverage: nothing to resume
    assert alone.exit_code == 2 and "only a --coverage run" in alone.output and not (tmp_path / "cov2").exists()
