"""llama.cpp's Q4_K grid: our packer against gguf-py's own dequantizer, the grid's rounding,
GPTQ and RTN on it, and the Q4_K export end to end (lossless, with Q4_1 where K is not a
multiple of 256, refused by the formats that cannot store it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from maverick_quant.bundle import Bundle
from maverick_quant.compress.gguf_blocks import BLOCK_TYPES, encode_blocks
from maverick_quant.compress.gptq import gptq_quantize
from maverick_quant.compress.grid import rtn_quantize
from maverick_quant.compress.kquant import kquant_params, rtn_quantize_k
from maverick_quant.errors import InputError
from maverick_quant.recipe import GGUF_GRIDS, QuantSpec

from conftest import make_tiny_llama, run_cli as _run

Q4_K = QuantSpec(**GGUF_GRIDS["Q4_K"])


def _gguf_dequantize(blocks: np.ndarray, name: str = "Q4_K") -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, name))


def _awkward_weights(seed: int) -> torch.Tensor:
    """[2, 6, 512] heavy-tailed weights with the cases a packer gets wrong: an all-zero
    super-block, a group far smaller than its neighbours (sc rounds to 0), an all-negative
    group, an all-positive row, large magnitudes."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(2, 6, 512, generator=g) * torch.rand(2, 6, 512, generator=g) ** 3
    W[0, 0, :256] = 0
    W[0, 1, :32] *= 1e-4
    W[0, 2, 64:96] = -W[0, 2, 64:96].abs() - 0.5
    W[1, 0] = W[1, 0].abs()
    W[1, 1] *= 1000
    return W


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_k_blocks_dequantize_in_gguf_py_to_our_values_bit_for_bit(seed: int) -> None:
    weight = rtn_quantize_k(_awkward_weights(seed))
    blocks = encode_blocks(weight, BLOCK_TYPES["Q4_K"])
    assert blocks.shape == (2, 6, 2 * 144)
    theirs = _gguf_dequantize(blocks.reshape(-1, blocks.shape[-1])).reshape(weight.shape)
    ours = weight.dequantize().numpy()
    assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32))


def test_q4_k_scale_bytes_unpack_to_our_six_bit_multipliers() -> None:
    """Every 6-bit value in every group position, through ggml's get_scale_min_k4 layout."""
    import gguf

    rtn = rtn_quantize_k(torch.randn(64, 256))
    sc = torch.arange(64 * 8).reshape(64, 8) % 64
    m = (sc * 7 + 3) % 64
    weight = dataclasses.replace(rtn, scales=sc.to(torch.uint8), zeros=m.to(torch.uint8))
    blocks = encode_blocks(weight, BLOCK_TYPES["Q4_K"])
    their_sc, their_m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
    assert np.array_equal(their_sc, sc.numpy()) and np.array_equal(their_m, m.numpy())


def test_q4_k_rounds_each_weight_to_its_nearest_grid_value() -> None:
    """Within a group's range, q * S - M is the nearest of the 16 values the group stores."""
    W = torch.randn(8, 512) * 0.05
    weight = rtn_quantize_k(W)
    step, offset = kquant_params(W).column_steps()
    grid = torch.arange(16.0)[:, None, None] * step - offset  # [16, N, K]
    nearest = (grid - W).abs().min(dim=0).values
    assert torch.allclose((weight.dequantize() - W).abs(), nearest, atol=1e-7)
    assert float((weight.dequantize() - W).norm() / W.norm()) < 0.12


def test_q4_k_weights_only_export_to_q4_k() -> None:
    weight = rtn_quantize_k(torch.randn(4, 256))
    for other in ("Q4_0", "Q4_1", "Q8_0"):
        with pytest.raises(ValueError, match="Q4_K"):
            encode_blocks(weight, BLOCK_TYPES[other])
    with pytest.raises(ValueError, match="not on it"):
        encode_blocks(rtn_quantize(torch.randn(4, 256), QuantSpec(**GGUF_GRIDS["Q4_1"])), BLOCK_TYPES["Q4_K"])


def test_k_quant_needs_q4_k_s_other_settings() -> None:
    with pytest.raises(InputError, match="k_quant"):
        QuantSpec(**{**GGUF_GRIDS["Q4_K"], "group_size": 64})


def _correlated_problem(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    X = torch.randn(2048, k, generator=g) @ mix * (torch.rand(k, generator=g) * 3 + 0.1)
    return torch.randn(n, k, generator=g) * 0.05, X.T @ X / X.shape[0]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_the_q4_k_grid_beats_its_round_to_nearest_and_exports_exactly(act_order: bool) -> None:
    W, H = _correlated_problem(48, 512)
    spec = QuantSpec(**{**GGUF_GRIDS["Q4_K"], "act_order": act_order})
    result = gptq_quantize(W, H, spec)
    assert result.weight.k_quant
    rtn = rtn_quantize(W, spec)

    def loss(Q: torch.Tensor) -> float:
        E = Q - W
        return float(((E @ H) * E).sum())

    assert loss(result.weight.dequantize()) < 0.8 * loss(rtn.dequantize())
    assert loss(result.weight.dequantize()) == pytest.approx(float(result.loss), rel=1e-4)
    blocks = encode_blocks(result.weight, BLOCK_TYPES["Q4_K"])
    assert np.array_equal(_gguf_dequantize(blocks), result.weight.dequantize().numpy())


def test_a_k_quant_spec_puts_matrices_whose_k_is_not_a_multiple_of_256_on_the_q4_1_grid() -> None:
    W, H = _correlated_problem(16, 96)
    for weight in (gptq_quantize(W, H, Q4_K).weight, rtn_quantize(W, Q4_K)):
        assert not weight.k_quant and weight.gguf_grid == "Q4_1" and weight.group_size == 32
        blocks = encode_blocks(weight, BLOCK_TYPES["Q4_1"])
        assert np.array_equal(_gguf_dequantize(blocks, "Q4_1"), weight.dequantize().numpy())


Q4_1 = QuantSpec(**GGUF_GRIDS["Q4_1"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_1_own_grid_blocks_dequantize_in_gguf_py_to_our_values_bit_for_bit(seed: int) -> None:
    """Free fp16 (d, m) per group: all-zero and all-negative groups, groups whose minimum is
    positive (a range without 0, which the (code - zero) x scale grid cannot hold), large values."""
    W = _awkward_weights(seed)
    W[1, 2] = W[1, 2].abs() + 3.0
    weight = rtn_quantize(W, Q4_1)
    assert weight.gguf_grid == "Q4_1" and tuple(weight.super_scales.shape) == (2, 6, 16)
    blocks = encode_blocks(weight, BLOCK_TYPES["Q4_1"])
    theirs = _gguf_dequantize(blocks.reshape(-1, blocks.shape[-1]), "Q4_1").reshape(weight.shape)
    assert np.array_equal(theirs.view(np.uint32), weight.dequantize().numpy().view(np.uint32))
    assert float((weight.dequantize()[1, 2] - W[1, 2]).abs().max()) < 0.2  # range [3, ~4] kept, 0 not forced in
    for other in ("Q4_0", "Q8_0", "Q4_K"):
        with pytest.raises(ValueError, match="Q4_1|not on it"):
            encode_blocks(weight, BLOCK_TYPES[other])


def test_weights_already_on_a_q4_1_grid_come_back_unchanged_from_rtn_and_gptq() -> None:
    """A model whose float weights are a Q4_1 GGUF's values (SmolLM2's here) loses nothing on
    Q4_1's own grid: gguf-py's round trip is a fixed point of our RTN and GPTQ (zero error, so
    GPTQ never moves a later column)."""
    import gguf

    W, H = _correlated_problem(24, 96, seed=3)
    on_grid = torch.from_numpy(_gguf_dequantize(gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q4_1), "Q4_1"))
    assert not torch.equal(on_grid, W)
    assert torch.equal(rtn_quantize(on_grid, Q4_1).dequantize(), on_grid)
    result = gptq_quantize(on_grid, H, Q4_1)
    assert torch.equal(result.weight.dequantize(), on_grid) and float(result.loss) == 0.0


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_q4_k_export_is_lossless_with_q4_1_where_k_is_not_a_multiple_of_256(smollm2_dir: Path, tmp_path: Path,
                                                                            method: str) -> None:
    """A Llama of hidden 256 and MLP width 320, solved by GPTQ or AWQ on the Q4_K grid:
    attention and gate/up are Q4_K, down (K=320) Q4_1; every tensor dequantizes in gguf-py to
    the bundle's values. Formats that store (code - zero) x scale grids refuse the bundle and
    name the format that stores it."""
    import gguf

    model = make_tiny_llama(smollm2_dir, tmp_path / "model", hidden_size=256, intermediate_size=320,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code, out = _run("quantize", model, "--data", text, "--out", tmp_path / "bundle", "--samples", 4, "--seq-len", 32,
                     "--gguf-grid", "Q4_K", "--method", method, "--no-progress")
    assert code == 0, out
    bundle = Bundle(tmp_path / "bundle")
    assert bundle.quant["k_quant"] is True
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "Q4_K", "--out", tmp_path / "m.gguf")
    assert code == 0 and "re-quantized" not in out, out
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_S
    for index in range(2):
        ours = bundle.layer_tensors(index)
        for gguf_name, name, expected_type in (("attn_v", "self_attn.v_proj", "Q4_K"), ("ffn_up", "mlp.up_proj", "Q4_K"),
                                               ("attn_output", "self_attn.o_proj", "Q4_K"),
                                               ("ffn_down", "mlp.down_proj", "Q4_1")):
            tensor = tensors[f"blk.{index}.{gguf_name}.weight"]
            value = ours[f"{name}.weight"]
            assert tensor.tensor_type.name == expected_type, gguf_name
            assert np.array_equal(_gguf_dequantize(tensor.data, expected_type).reshape(value.shape), value.numpy())
    for fmt in ("gptq", "compressed-tensors"):
        code, out = _run("export", tmp_path / "bundle", "--format", fmt, "--out", tmp_path / fmt)
        assert code == 2 and "Q4_K" in out and not (tmp_path / fmt).exists(), out
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "Q4_1", "--out", tmp_path / "b.gguf")
    assert code == 2 and "K-quant" in out, out
    # a float GGUF of the bundle (llama-quantize's input) holds its dequantized values
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "f.gguf")
    assert code == 0 and "re-quantized" not in out, out
    floats = {t.name: t for t in gguf.GGUFReader(tmp_path / "f.gguf").tensors}
    up = bundle.layer_tensors(1)["mlp.up_proj.weight"]
    assert floats["blk.1.ffn_up.weight"].tensor_type.name == "F32"
    assert np.array_equal(np.asarray(floats["blk.1.ffn_up.weight"].data).reshape(up.shape), up.numpy())


def test_a_float_model_exports_as_round_to_nearest_q4_k(tiny_llama_dir: Path, smollm2_dir: Path, tmp_path: Path) -> None:
    """gguf-py cannot quantize Q4_K: the plain GGUF of a float model uses our RTN on its grid."""
    import gguf

    model = make_tiny_llama(smollm2_dir, tmp_path / "model", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    code, out = _run("export", model, "--format", "gguf", "--gguf-type", "Q4_K", "--out", tmp_path / "rtn.gguf")
    assert code == 0 and "re-quantized" in out, out
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "rtn.gguf").tensors}
    from maverick_quant.streaming import open_source

    up = open_source(model).layer_tensors(0)["mlp.up_proj.weight"].float()
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q4_K"
    assert np.array_equal(_gguf_dequantize(tensors["blk.0.ffn_up.weight"].data).reshape(up.shape),
                          rtn_quantize_k(up).dequantize().numpy())


@pytest.mark.parametrize("grid", ["Q4_1", "Q4_K"])
def test_an_offset_grid_refuses_widths_its_blocks_cannot_hold_before_any_work(grid: str, tiny_llama4_dir: Path,
                                                                             tmp_path: Path) -> None:
    """The tiny Llama 4's dense down_proj reads 48 columns, not a multiple of llama.cpp's blocks of
    32: refused naming it before the first layer (it was a ValueError mid-run, exit 3); kept in
    float, the run goes through."""
    from conftest import run_cli

    args = ["quantize", tiny_llama4_dir, "--method", "rtn", "--gguf-grid", grid, "--no-progress"]
    code, out = run_cli(*args, "--out", tmp_path / "refused")
    assert code == 2 and "layers.0.feed_forward.down_proj (K=48)" in out, out
    assert not any(tmp_path.iterdir())
    code, out = run_cli(*args, "--out", tmp_path / "bundle", "--keep-float", r"feed_forward\.down_proj")
    assert code == 0 and Bundle(tmp_path / "bundle").quant["free_min" if grid == "Q4_1" else "k_quant"], out
    layers = Bundle(tmp_path / "bundle").manifest["layers"]  # no quantized linear runs on the kernels: each is named
    quantized = sum(len(layer["quantized"]) + 3 * bool(layer.get("experts")) for layer in layers)
    assert f"cannot run {quantized} linears of this bundle" in out and f"llama.cpp's {grid} grid" in out, out
