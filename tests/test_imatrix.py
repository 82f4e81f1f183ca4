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


def test_imatrix_refuses_a_directory_as_output(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["imatrix", str(tiny_llama_dir), "--data", "self", "--out", str(tmp_path), "--force"])
    assert result.exit_code == 2 and "is a directory" in result.output
