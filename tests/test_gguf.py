"""GGUF export: llama.cpp block encodings checked against gguf-py's own dequantizer, the
rotary row permutation, and whole exports read back with gguf-py's reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from maverick_quant.bundle import Bundle
from maverick_quant.compress.gguf_blocks import BLOCK_TYPES, encode_blocks
from maverick_quant.compress.grid import rtn_quantize
from maverick_quant.exporters.gguf import rotary_row_permutation
from maverick_quant.recipe import GGUF_GRIDS, QuantSpec

from conftest import make_tiny_llama4, run_cli as _run


def _dequantize(reader_tensor) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(reader_tensor.data, reader_tensor.tensor_type)


@pytest.mark.parametrize("gguf_type,group", [("Q4_0", 32), ("Q4_0", 128), ("Q4_0", -1), ("Q8_0", 32), ("Q8_0", 64),
                                              ("Q4_1", 32)])
def test_blocks_dequantize_in_gguf_py_to_our_values(gguf_type: str, group: int) -> None:
    import gguf

    grid = {**GGUF_GRIDS[gguf_type], "group_size": group}
    weight = rtn_quantize(torch.randn(3, 5, 256) * 0.1, QuantSpec(**grid))
    blocks = encode_blocks(weight, BLOCK_TYPES[gguf_type])
    theirs = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, gguf_type))
    assert np.array_equal(theirs, weight.dequantize().numpy())


def test_q4_1_needs_scales_whose_zero_products_are_fp16() -> None:
    """A plain asymmetric grid (11-bit scales) is not on Q4_1's grid (7-bit scales are; so is --gguf-grid Q4_1's own)."""
    weight = rtn_quantize(torch.randn(64, 256), QuantSpec(bits=4, group_size=32, sym=False))
    with pytest.raises(ValueError, match="fp16"):
        encode_blocks(weight, BLOCK_TYPES["Q4_1"])


def test_rotary_permutation_turns_half_split_rope_into_interleaved_pairs() -> None:
    """HF rotates (x_i, x_{i+d/2}); llama.cpp rotates (x_2i, x_2i+1). Permuting q's rows by
    `rotary_row_permutation` makes the two agree: perm(rope_hf(q)) == rope_pairs(perm(q))."""
    heads, d = 3, 8
    q = torch.randn(heads * d, dtype=torch.float64)
    angles = torch.rand(d // 2, dtype=torch.float64) * 3
    cos, sin = torch.cos(angles), torch.sin(angles)
    halves = q.view(heads, 2, d // 2)
    hf = torch.stack((halves[:, 0] * cos - halves[:, 1] * sin, halves[:, 1] * cos + halves[:, 0] * sin), 1).reshape(-1)
    order = rotary_row_permutation(heads * d, heads)
    pairs = q[order].view(heads, d // 2, 2)
    interleaved = torch.stack((pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin), -1)
    torch.testing.assert_close(hf[order], interleaved.reshape(-1))


@pytest.fixture(scope="module")
def tiny_q4_0(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    text = root / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code, out = _run("quantize", tiny_llama_dir, "--data", text, "--out", root / "bundle", "--samples", 4,
                     "--seq-len", 32, "--gguf-grid", "Q4_0", "--no-progress")
    assert code == 0, out
    code, out = _run("export", root / "bundle", "--format", "gguf", "--gguf-type", "Q4_0", "--out", root / "model.gguf")
    assert code == 0, out
    assert "export gguf Q4_0: 100%" in out and "B/s" in out  # the progress bar, in bytes with a rate
    return {"root": root, "bundle": root / "bundle", "gguf": root / "model.gguf", "text": text}


def test_dense_export_holds_the_bundle_bit_for_bit(tiny_q4_0) -> None:
    import gguf

    reader = gguf.GGUFReader(tiny_q4_0["gguf"])
    tensors = {t.name: t for t in reader.tensors}
    bundle = Bundle(tiny_q4_0["bundle"])
    config = bundle.text_config
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == config.num_hidden_layers
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == config.vocab_size
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 1000
    head_dim = config.hidden_size // config.num_attention_heads
    assert reader.fields["llama.rope.dimension_count"].contents() == head_dim
    assert reader.fields["llama.attention.head_count_kv"].contents() == config.num_key_value_heads
    assert reader.fields["llama.feed_forward_length"].contents() == config.intermediate_size
    assert {"output.weight", "output_norm.weight", "blk.0.ffn_up.weight", "blk.0.ffn_norm.weight"} <= set(tensors)
    for index in range(bundle.num_layers):
        ours = bundle.layer_tensors(index)
        q_order = rotary_row_permutation(config.hidden_size, config.num_attention_heads)
        k_rows = ours["self_attn.k_proj.weight"].shape[0]
        k_order = rotary_row_permutation(k_rows, config.num_key_value_heads)
        expected = {"attn_q": ours["self_attn.q_proj.weight"][q_order], "attn_k": ours["self_attn.k_proj.weight"][k_order],
                    "attn_v": ours["self_attn.v_proj.weight"], "attn_output": ours["self_attn.o_proj.weight"],
                    "ffn_gate": ours["mlp.gate_proj.weight"], "ffn_down": ours["mlp.down_proj.weight"],
                    "attn_norm": ours["input_layernorm.weight"]}
        for name, value in expected.items():
            tensor = tensors[f"blk.{index}.{name}.weight"]
            assert tensor.tensor_type.name == ("F32" if name.endswith("norm") else "Q4_0")
            assert list(tensor.shape) == list(value.shape)[::-1]  # GGUF lists ne0 (K) first
            assert np.array_equal(_dequantize(tensor).reshape(value.shape), value.numpy()), (index, name)
    embed = bundle.model_tensor(bundle.table.embed)
    assert np.array_equal(_dequantize(tensors["token_embd.weight"]).reshape(embed.shape), embed.numpy())


def test_grid_mismatch_is_refused_or_requantized_with_its_error(tiny_q4_0) -> None:
    root = tiny_q4_0["root"]
    code, out = _run("export", tiny_q4_0["bundle"], "--format", "gguf", "--gguf-type", "Q4_1", "--out", root / "q41.gguf")
    assert code == 2 and "--gguf-grid Q4_1" in out and "--requantize" in out, out
    assert not (root / "q41.gguf").exists() and not list(root.glob(".q41.gguf*"))
    code, out = _run("export", tiny_q4_0["bundle"], "--format", "gguf", "--gguf-type", "Q8_0", "--requantize",
                     "--out", root / "q80.gguf")
    assert code == 0 and "re-quantized" in out and "relative error added" in out, out
    code, out = _run("export", tiny_q4_0["bundle"], "--format", "gguf", "--out", root / "model.gguf")
    assert code == 2 and "--force" in out


def test_llama4_export_stacks_experts_and_keeps_the_router_in_f32(smollm2_dir: Path, tmp_path: Path) -> None:
    import gguf

    model = make_tiny_llama4(smollm2_dir, tmp_path / "model", intermediate_size_mlp=64, attention_chunk_size=8192)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code, out = _run("quantize", model, "--data", text, "--out", tmp_path / "bundle", "--samples", 4, "--seq-len", 32,
                     "--gguf-grid", "Q8_0", "--no-progress")
    assert code == 0, out
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "Q8_0", "--out", tmp_path / "m.gguf")
    assert code == 0, out
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "llama4"
    assert reader.fields["llama4.expert_count"].contents() == 8
    assert reader.fields["llama4.interleave_moe_layer_step"].contents() == 2
    assert not any("vision" in name or "projector" in name for name in tensors)
    bundle = Bundle(tmp_path / "bundle")
    ours = bundle.layer_tensors(1)
    gate_up = ours["feed_forward.experts.gate_up_proj"]  # [E, D, 2I], input-major
    inter = gate_up.shape[-1] // 2
    gate = gate_up[..., :inter].transpose(1, 2)  # [E, I, D]
    stacked = tensors["blk.1.ffn_gate_exps.weight"]
    assert stacked.tensor_type.name == "Q8_0"
    assert np.array_equal(_dequantize(stacked).reshape(gate.shape), gate.numpy())
    down = ours["feed_forward.experts.down_proj"].transpose(1, 2)  # [E, D, I]
    assert np.array_equal(_dequantize(tensors["blk.1.ffn_down_exps.weight"]).reshape(down.shape), down.numpy())
    router = tensors["blk.1.ffn_gate_inp.weight"]
    assert router.tensor_type.name == "F32"
    assert np.array_equal(_dequantize(router).reshape(ours["feed_forward.router.weight"].shape),
                          ours["feed_forward.router.weight"].numpy())
    # the attention of Llama 4 is not permuted (llama.cpp's llama4 uses HF's rotary layout)
    assert np.array_equal(_dequantize(tensors["blk.0.attn_q.weight"]).reshape(ours["self_attn.q_proj.weight"].shape),
                          bundle.layer_tensors(0)["self_attn.q_proj.weight"].numpy())
    _experts_land_at_their_own_index(bundle)


def _experts_land_at_their_own_index(bundle: Bundle) -> None:
    """Chunks are placed at their recorded first expert, not in the order they come (a manifest
    listing them otherwise shuffled experts silently); overlaps and gaps are refused."""
    from maverick_quant.errors import InputError
    from maverick_quant.exporters.gguf import plan_gguf_export
    from maverick_quant.exporters.gguf_weights import BundleWeights

    plan, _, _ = plan_gguf_export(BundleWeights(bundle), "Q8_0")
    [(first, whole)] = list(bundle.expert_linear_chunks(1, "gate_proj"))
    shape, name = (whole.codes.shape[0], whole.codes.shape[1], whole.codes.shape[2]), "blk.1.ffn_gate_exps.weight"
    in_order = plan._stack_experts(name, shape, [(first, whole)])
    assert np.array_equal(plan._stack_experts(name, shape, [(4, whole[4:]), (0, whole[:4])]), in_order)
    with pytest.raises(InputError, match="expert chunk at 4 .4 experts. overlaps another"):
        plan._stack_experts(name, shape, [(0, whole), (4, whole[4:])])
    with pytest.raises(InputError, match="the bundle holds 4 experts, the config 8"):
        plan._stack_experts(name, shape, [(0, whole[:4])])


def test_a_chat_template_kept_in_chat_template_json_reaches_the_gguf(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Llama 4's repositories ship chat_template.json; bundles did not copy it, so a GGUF made
    from a bundle had no tokenizer.chat_template where one made from the model folder had."""
    import gguf

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    template = config.pop("chat_template", None) or (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    code, out = _run("quantize", model, "--method", "rtn", "--gguf-grid", "Q8_0", "--out", tmp_path / "bundle",
                     "--no-progress")
    assert code == 0, out
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "Q8_0", "--out", tmp_path / "m.gguf")
    assert code == 0, out
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.chat_template"].contents() == template


def test_llama4_configurations_llama_cpp_cannot_run_are_refused(tiny_llama4_dir: Path, tmp_path: Path) -> None:
    """The shared tiny Llama 4 chunks attention every 16 tokens; llama.cpp fixes 8192."""
    code, out = _run("quantize", tiny_llama4_dir, "--method", "rtn", "--group-size", 32, "--bits", 8,
                     "--out", tmp_path / "bundle", "--no-progress")
    assert code == 0, out
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "Q8_0", "--requantize",
                     "--out", tmp_path / "m.gguf")
    assert code == 2 and "attention_chunk_size=16" in out, out
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_has_a_model_card_and_a_manifest_that_inspect_verifies(tiny_q4_0) -> None:
    path = tiny_q4_0["gguf"]
    card = path.with_name(path.name + ".README.md").read_text()
    assert "Q4_0" in card and "source fingerprint" in card and "llama.cpp" in card
    code, out = _run("inspect", path)
    assert code == 0 and "GGUF llama" in out and "Q4_0:" in out and "verified" in out, out


def test_inspect_reports_a_truncated_gguf_instead_of_a_traceback(tiny_q4_0, tmp_path: Path) -> None:
    """The manifest is checked first; a file gguf-py can no longer parse is named as unreadable
    (exit 1), where the summary used to raise a ValueError from deep inside gguf-py."""
    import shutil

    source = tiny_q4_0["gguf"]
    for sidecar in (source, source.with_name(source.name + ".manifest.json")):
        shutil.copy(sidecar, tmp_path / sidecar.name)
    copy = tmp_path / source.name
    with open(copy, "r+b") as handle:
        handle.truncate(copy.stat().st_size - 1000)
    code, out = _run("inspect", copy)
    assert code == 1 and f"{copy}: cannot be read" in out and "hash or size mismatch" in out and copy.name in out, out
    code, out = _run("inspect", copy, "--no-verify")  # unreadable fails even unhashed
    assert code == 1 and f"{copy.name} (unreadable)" in out, out
    (tmp_path / "random.gguf").write_bytes(bytes(range(256)) * 4)  # not a GGUF at all: bad input, not a mismatch
    code, out = _run("inspect", tmp_path / "random.gguf")
    assert code == 2 and "not a GGUF file (it starts with b'\\x00\\x01\\x02\\x03'" in out, out
    code, out = _run("inspect", tmp_path / "missing")
    assert code == 2 and "does not exist" in out, out


def test_a_float_model_exports_as_gguf_pys_own_round_to_nearest(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The plain GGUF baseline: every linear rounded by gguf-py from the float checkpoint."""
    import gguf

    from maverick_quant.streaming import open_source

    code, out = _run("export", tiny_llama_dir, "--format", "gguf", "--gguf-type", "Q4_0", "--out", tmp_path / "rtn.gguf")
    assert code == 0 and "re-quantized" in out, out
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "rtn.gguf").tensors}
    source = open_source(tiny_llama_dir)
    q = source.layer_tensors(1)["self_attn.q_proj.weight"].float()
    q = q[rotary_row_permutation(q.shape[0], source.config.num_attention_heads)].numpy()  # llama.cpp's row order
    expected = gguf.quants.dequantize(gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(_dequantize(tensors["blk.1.attn_q.weight"]).reshape(q.shape), expected)
    assert "no calibration" in (tmp_path / "rtn.gguf.README.md").read_text()


def test_q4_1_grid_exports_losslessly_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import gguf

    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--gguf-grid", "Q4_1", "--out", tmp_path / "bundle",
                     "--no-progress")
    assert code == 0, out
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "Q4_1", "--out", tmp_path / "m.gguf")
    assert code == 0 and "re-quantized" not in out, out
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    down = Bundle(tmp_path / "bundle").layer_tensors(2)["mlp.down_proj.weight"]
    assert tensors["blk.2.ffn_down.weight"].tensor_type.name == "Q4_1"
    assert np.array_equal(_dequantize(tensors["blk.2.ffn_down.weight"]).reshape(down.shape), down.numpy())


def test_round_to_nearest_on_the_q4_0_grid_is_llama_cpps_own_q4_0() -> None:
    """`--gguf-grid Q4_0` uses llama.cpp's scale rule (d = the block's value of largest
    magnitude / -8, so d < 0 when it is positive): round to nearest on our grid gives
    llama.cpp's own Q4_0 values (gguf-py's quantizer, the reference llama-quantize follows),
    up to the rare code llama.cpp picks with the unrounded d; the extreme of every block is
    exact up to d's fp16 rounding; and the weight error is 20-25% below the min/max grid's."""
    import gguf

    weights = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    weights[::7, ::29] *= 8  # outliers, as in real checkpoints
    ours = rtn_quantize(weights, QuantSpec(**GGUF_GRIDS["Q4_0"]))
    assert (ours.scales < 0).any() and (ours.scales > 0).any()
    values = ours.dequantize()
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    theirs = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weights.numpy(), q4_0), q4_0))
    assert (values == theirs).double().mean() > 0.999
    assert (values - weights).square().sum() <= (theirs - weights).square().sum()  # rounding with the stored d
    blocks, block_values = weights.reshape(-1, 32), values.reshape(-1, 32)
    extreme = blocks.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(block_values.gather(-1, extreme), blocks.gather(-1, extreme), rtol=2**-11, atol=0)
    minmax = rtn_quantize(weights, QuantSpec(bits=4, group_size=32, sym=True)).dequantize()
    ratio = float((values - weights).square().sum() / (minmax - weights).square().sum())
    assert ratio < 0.85, ratio


def test_signed_scale_is_an_option_of_any_symmetric_grid(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`quantize --signed-scale`: llama.cpp's Q4_0 rule on another symmetric grid (group 64),
    recorded in the bundle and stored by the GPTQ export; refused on an asymmetric grid."""
    from maverick_quant.bundle import Bundle
    from maverick_quant.exporters.registry import open_export

    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--group-size", 64, "--signed-scale",
                     "--out", tmp_path / "bundle", "--no-progress")
    assert code == 0, out
    bundle = Bundle(tmp_path / "bundle")
    assert bundle.manifest["recipe"]["weights"]["signed_scale"] is True
    scales = bundle.quantized_layer(1)[0]["self_attn.q_proj"].scales
    assert (scales < 0).any() and (scales > 0).any()
    code, out = _run("export", tmp_path / "bundle", "--format", "gptq", "--out", tmp_path / "gptq")
    assert code == 0, out
    ours, theirs = bundle.layer_tensors(1), open_export(tmp_path / "gptq").layer_tensors(1)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert "scale rule: max-magnitude weight / -8" in (tmp_path / "gptq" / "README.md").read_text()
    assert "sym signed-scale" in _run("inspect", tmp_path / "bundle")[1]
    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--asym", "--signed-scale",
                     "--out", tmp_path / "asym", "--no-progress")
    assert code == 2 and "signed_scale" in out and "symmetric" in out


def test_clip_search_bundles_stay_lossless_in_gguf_and_are_refused_on_q4_k(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`quantize --clip-search` on the Q4_0 grid: recorded in the bundle, the card and `inspect`,
    and still stored by GGUF Q4_0 bit for bit (Q4_0 keeps any fp16 scale); refused with Q4_K,
    whose own search chooses its ranges."""
    import gguf

    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--gguf-grid", "Q4_0", "--clip-search",
                     "--out", tmp_path / "bundle", "--no-progress")
    assert code == 0, out
    bundle = Bundle(tmp_path / "bundle")
    assert bundle.manifest["recipe"]["weights"]["clip_search"] is True
    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--gguf-grid", "Q4_0", "--out", tmp_path / "plain",
                     "--no-progress")
    assert code == 0, out
    searched, plain = (Bundle(path).quantized_layer(1)[0]["mlp.down_proj"] for path in (tmp_path / "bundle", tmp_path / "plain"))
    assert not torch.equal(searched.scales, plain.scales)
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "Q4_0", "--out", tmp_path / "m.gguf")
    assert code == 0, out
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    down = searched.dequantize()
    assert np.array_equal(_dequantize(tensors["blk.1.ffn_down.weight"]).reshape(down.shape), down.numpy())
    assert "least |w - q|^2.4" in (tmp_path / "m.gguf.README.md").read_text()
    assert "clip-search" in _run("inspect", tmp_path / "bundle")[1]
    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--gguf-grid", "Q4_K", "--clip-search",
                     "--out", tmp_path / "q4k", "--no-progress")
    assert code == 2 and "clip_search" in out and "Q4_K" in out


def test_llama3_rope_factors_follow_llama_cpps_formula() -> None:
    """rope_freqs for llama3 rope scaling, against the formula llama.cpp's converter writes
    (per frequency: 1 below the high-frequency wavelength, `factor` above the low one, a smooth
    blend between); other scaled rope types are refused, not written without their factors."""
    import math

    from transformers import LlamaConfig

    from maverick_quant.errors import InputError
    from maverick_quant.exporters.gguf_metadata import rope_factors

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=scaling)
    dim, old = 64, 8192
    expected = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * 500000.0 ** (i / dim)
        if wavelength < old / 4.0:
            expected.append(1.0)
        elif wavelength > old / 1.0:
            expected.append(8.0)
        else:
            smooth = (old / wavelength - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / 8.0 + smooth))
    factors = rope_factors(config)
    assert 1.0 in expected and 8.0 in expected and any(1.0 < f < 8.0 for f in expected)  # all three branches met
    torch.testing.assert_close(factors, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=0)
    assert rope_factors(LlamaConfig(hidden_size=256, num_attention_heads=4)) is None
    yarn = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                              "original_max_position_embeddings": 4096})
    with pytest.raises(InputError, match="rope_type 'yarn' is not written yet"):
        rope_factors(yarn)


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# the "original regex from tokenizer.json" llama.cpp's llama-vocab.cpp quotes for LLAMA_VOCAB_PRE_TYPE_GPT4O
_LLAMA4_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


@pytest.mark.parametrize("steps, name", [
    ([{**_BYTE_LEVEL, "use_regex": True}], "gpt-2"),
    ([{"type": "Digits", "individual_digits": True}, {**_BYTE_LEVEL, "use_regex": True}], "smollm"),
    ([_split(_LLAMA4_SPLIT), _BYTE_LEVEL], "llama4"),
    # near misses llama.cpp would split by GPT-4o's rules anyway: left for --gguf-pre, never guessed
    ([_split(_LLAMA4_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")), _BYTE_LEVEL], None),
    ([_split(_LLAMA4_SPLIT.split("|[^")[0] + "|" + _LLAMA4_SPLIT.split("|", 9)[-1]), _BYTE_LEVEL], None),
    ([{**_split(_LLAMA4_SPLIT), "behavior": "Removed"}, _BYTE_LEVEL], None),
    ([_split(_LLAMA3_SPLIT), _BYTE_LEVEL], None),  # Llama 3's regex: named only by --gguf-pre, never taken for Llama 4's
    ([{"type": "Metaspace", "replacement": "▁"}], None),
])
def test_the_pre_tokenizer_is_named_from_tokenizer_json(tmp_path: Path, steps: list, name) -> None:
    import json

    from maverick_quant.exporters.gguf_metadata import tokenizer_pre

    pre = steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre, "model": {"type": "BPE"}}))
    assert tokenizer_pre(tmp_path) == name


@pytest.mark.parametrize("model, decoder, ok", [
    ({"type": "BPE", "byte_fallback": False}, {"type": "ByteLevel"}, True),
    ({"type": "BPE", "byte_fallback": True}, {"type": "Sequence", "decoders": [{"type": "ByteFallback"}]}, False),
    ({"type": "BPE", "byte_fallback": False}, {"type": "Metaspace"}, False),
    ({"type": "Unigram"}, {"type": "ByteLevel"}, False),
])
def test_only_byte_level_bpe_vocabularies_are_written(tmp_path: Path, model: dict, decoder: dict, ok: bool) -> None:
    """A SentencePiece-style BPE (byte fallback, `▁` spaces) written as GPT-2 byte-level tokens
    would tokenize wrongly in llama.cpp: refused, naming tokenizer.json."""
    import json

    from maverick_quant.errors import InputError
    from maverick_quant.exporters.gguf_metadata import check_byte_level

    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model, "decoder": decoder}))
    if ok:
        check_byte_level(tmp_path)
    else:
        with pytest.raises(InputError, match="tokenizer.json: .* --format gguf writes byte-level BPE vocabularies only"):
            check_byte_level(tmp_path)


def test_gguf_pre_names_the_pre_tokenizer_llama_cpp_reads(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import gguf

    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--group-size", 32, "--out", tmp_path / "b",
                     "--no-progress")
    assert code == 0, out
    for pre, expected in ((None, "gpt-2"), ("llama3", "llama3")):
        path = tmp_path / f"{expected}.gguf"
        code, out = _run("export", tmp_path / "b", "--format", "gguf", "--gguf-type", "Q8_0", "--requantize", "--out", path,
                         *(["--gguf-pre", pre] if pre else []))
        assert code == 0, out
        field = gguf.GGUFReader(path).fields["tokenizer.ggml.pre"]
        assert bytes(field.parts[field.data[0]]).decode() == expected


def test_llama4_attention_layer_types_llama_cpp_cannot_run_are_refused() -> None:
    """llama.cpp chunks attention on 3 layers of 4; transformers follows `layer_types`, which a
    config may set otherwise (all full attention here): such a GGUF would compute another function."""
    from maverick_quant.arch.llama4 import maverick_config
    from maverick_quant.errors import InputError
    from maverick_quant.exporters.gguf_metadata import check_llama4_for_llama_cpp

    check_llama4_for_llama_cpp(maverick_config().text_config)  # Maverick's own: accepted
    full = maverick_config(layer_types=["full_attention"] * 48).text_config
    with pytest.raises(InputError, match=r"layer_types=\['full_attention'"):
        check_llama4_for_llama_cpp(full)


def test_a_replaced_gguf_never_keeps_the_old_files_card_and_manifest(tiny_q4_0, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`export --force` over a GGUF: while the new file is written under a temporary name the old
    one, and its card and manifest, stay (a failed export changes nothing); once the new file is
    renamed in, the old card and manifest go before anything else can fail (an mmproj write, the
    new sidecars), so none is left describing another file."""
    import shutil

    import maverick_quant.exporters.artifact as artifact
    import maverick_quant.exporters.gguf as gguf_exporter

    source = tiny_q4_0["gguf"]
    sidecars = [tmp_path / (source.name + suffix) for suffix in (".README.md", ".manifest.json")]
    for name in (source.name, *(path.name for path in sidecars)):
        shutil.copy(source.with_name(name), tmp_path / name)
    export = ["export", tiny_q4_0["bundle"], "--format", "gguf", "--gguf-type", "Q4_0", "--out", tmp_path / source.name,
              "--force"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(gguf_exporter, "export_gguf", disk_full)
        code, out = _run(*export)
    assert code == 2 and "the disk is full; fix the cause and run the command again" in out, out
    assert all(path.exists() for path in sidecars)  # the old file is untouched, so its card and manifest stay true
    monkeypatch.setattr(artifact, "write_gguf_sidecars", disk_full)
    code, out = _run(*export)
    assert code == 2 and not any(path.exists() for path in sidecars), out

def test_a_gguf_export_neither_replaces_files_beside_it_nor_reads_its_report_late(tiny_q4_0, tmp_path: Path) -> None:
    """A user's NAME.gguf.README.md beside the output was overwritten without --force; a damaged
    --report was read after the whole export (a traceback, and the new GGUF left without its card)."""
    card = tmp_path / "m.gguf.README.md"
    card.write_text("mine")
    code, out = _run("export", tiny_q4_0["bundle"], "--format", "gguf", "--gguf-type", "Q4_0", "--out", tmp_path / "m.gguf")
    assert code == 2 and "m.gguf.README.md: output already exists" in out and card.read_text() == "mine", out
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text("{")
    code, out = _run("export", tiny_q4_0["bundle"], "--format", "gguf", "--gguf-type", "Q4_0", "--out", tmp_path / "n.gguf",
                     "--report", report)
    assert code == 2 and "report.json: cannot read a validation report" in out, out
    assert not (tmp_path / "n.gguf").exists() and not (tmp_path / "n.gguf.manifest.json").exists()


def test_an_f16_export_of_values_past_65504_is_refused_naming_the_tensor(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Dequantized values above F16's range were written as Inf into the GGUF (exit 0)."""
    from tests.test_checkpoint import _rewrite_tensor, _tensor

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    name = "model.layers.0.self_attn.q_proj.weight"
    weight = _tensor(model, name)
    weight[1] *= 1e6
    _rewrite_tensor(model, name, weight)
    code, out = _run("quantize", model, "--method", "rtn", "--group-size", 32, "--out", tmp_path / "bundle", "--no-progress")
    assert code == 0, out
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "F16", "--out", tmp_path / "f16.gguf")
    assert code == 2 and "blk.0.attn_q.weight: values of magnitude up to" in out and "exceed F16's 65504" in out, out
    assert not (tmp_path / "f16.gguf").exists()
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "f32.gguf")
    assert code == 0, out
