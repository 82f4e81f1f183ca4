"""compressed-tensors export: bit-exact packing checked against compressed-tensors' own
decompressor, and transformers + compressed-tensors loading our exports (dense and Llama 4)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maverick_quant.bundle import Bundle
from maverick_quant.cli import cli
from maverick_quant.compress.grid import rtn_quantize
from maverick_quant.compress.pack import from_compressed_tensors, to_compressed_tensors
from maverick_quant.exporters.registry import open_export
from maverick_quant.recipe import QuantSpec

from conftest import bundle_logits, make_tiny_llama4, model_logits


def _run(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("bits,sym,group", [(4, True, 32), (4, False, 32), (8, True, -1), (8, False, 64)])
def test_packing_round_trips_and_decompresses_to_our_values(bits: int, sym: bool, group: int) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from maverick_quant.exporters.compressed_tensors import ct_quantization_config

    torch.manual_seed(bits + sym)
    weight = rtn_quantize(torch.randn(24, 128), QuantSpec(bits=bits, group_size=group, sym=sym))
    tensors = to_compressed_tensors(weight, sym, torch.float32)
    assert ("weight_zero_point" in tensors) is (not sym)
    back = from_compressed_tensors(tensors, bits, group)
    assert torch.equal(back.codes, weight.codes) and torch.equal(back.zeros, weight.zeros)
    assert torch.equal(back.scales, weight.scales.float())

    config = ct_quantization_config({"bits": bits, "group_size": group, "sym": sym}, {})
    scheme = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
    theirs = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]
    assert torch.equal(theirs, weight.dequantize())


def test_group_that_does_not_tile_k_is_refused() -> None:
    weight = rtn_quantize(torch.randn(8, 96), QuantSpec(bits=4, group_size=64, sym=True))
    with pytest.raises(ValueError, match="multiple of the group size"):
        to_compressed_tensors(weight, True, torch.float32)


@pytest.mark.parametrize("grid", [["--sym"], ["--asym"], ["--gguf-grid", "Q4_0"]])
def test_transformers_loads_a_dense_export(tiny_llama_dir: Path, small_text_file: Path, tmp_path: Path, grid: list) -> None:
    """transformers + compressed-tensors decompress our pack-quantized export on the CPU and
    compute the same logits as the dequantized bundle (fp rounding aside); Q4_0's grid has
    negative scales (llama.cpp's rule), stored as they are, and the model card says which
    loaders take them."""
    from transformers import CompressedTensorsConfig

    sym = grid != ["--asym"]
    _run("quantize", tiny_llama_dir, "--data", small_text_file, "--out", tmp_path / "bundle", "--samples", 4,
         "--seq-len", 32, "--group-size", 32, *grid, "--no-progress")
    _run("export", tmp_path / "bundle", "--format", "compressed-tensors", "--out", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and weights["symmetric"] is sym and weights["group_size"] == 32
    import compressed_tensors  # `version` is the format's (compressed-tensors'), ours is `quantizer`'s

    assert config["version"] == compressed_tensors.__version__ and config["quantizer"].startswith("maverick-quant:")
    # the card warns against vLLM's W4A8-INT8 Marlin mode exactly when the scales may be negative
    assert ("VLLM_MARLIN_INPUT_DTYPE=int8" in (tmp_path / "ct" / "README.md").read_text()) is (grid[0] == "--gguf-grid")

    bundle = Bundle(tmp_path / "bundle")
    export = open_export(tmp_path / "ct")
    for index in range(bundle.num_layers):
        ours, theirs = bundle.layer_tensors(index), export.layer_tensors(index)
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = bundle_logits(tiny_llama_dir, bundle, ids, tmp_path / "float")
    # the card's mode: compressed (transformers' default) on a symmetric grid; packed zero points need dequantize=True
    card = (tmp_path / "ct" / "README.md").read_text()
    assert ("CompressedTensorsConfig(dequantize=True)" in card) is (not sym)
    modes = [{"quantization_config": CompressedTensorsConfig(dequantize=True)}] + ([{}] if sym else [])
    for mode in modes:
        torch.testing.assert_close(model_logits(tmp_path / "ct", ids, **mode), ours, rtol=1e-4, atol=1e-4)


def test_transformers_loads_a_llama4_moe_export(smollm2_dir: Path, small_text_file: Path, tmp_path: Path) -> None:
    """A Llama 4 bundle (per-expert modules, router and vision tower ignored) through
    transformers' sequential quantized experts gives the dequantized bundle's logits."""
    from transformers import CompressedTensorsConfig

    tiny_llama4_dir = make_tiny_llama4(smollm2_dir, tmp_path / "model", intermediate_size_mlp=64)  # groups tile K

    _run("quantize", tiny_llama4_dir, "--data", small_text_file, "--out", tmp_path / "bundle", "--samples", 4,
         "--seq-len", 32, "--group-size", 32, "--no-progress")
    _run("export", tmp_path / "bundle", "--format", "compressed-tensors", "--out", tmp_path / "ct")
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert any("router" in pattern for pattern in ignore) and any("vision_model" in pattern for pattern in ignore)
    ignored = lambda name: any(re.fullmatch(p[3:], name) if p.startswith("re:") else p == name for p in ignore)  # noqa: E731
    attention = "language_model.model.layers.{}.self_attn.{}_proj"
    # rope layers' q/k/v are float for vLLM (tests/test_moe_quantize.py); layer 3 is NoPE and stays packed
    assert all(ignored(attention.format(i, p)) == (i != 3) for i in range(4) for p in "qkv"), ignore

    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(2))
    ours = bundle_logits(tiny_llama4_dir, Bundle(tmp_path / "bundle"), ids, tmp_path / "float")
    theirs = model_logits(tmp_path / "ct", ids, quantization_config=CompressedTensorsConfig(dequantize=True))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model_logits(tmp_path / "ct", ids), ours, rtol=1e-4, atol=1e-4)  # compressed, as the card says
    # the text alone (Llama4ForCausalLM: `model.layers.N...`, no `language_model.`) keeps the same modules in float:
    # the ignore patterns used to name them with the prefix, and the rope layers' float q/k/v were then quantized
    from transformers import AutoModelForCausalLM

    text_only = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    assert type(text_only).__name__ == "Llama4ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(text_only(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
    # the same bundle as GPTQ: in this interleaved layout neither transformers nor GPTQModel loads it right
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "bundle"), "--format", "gptq", "--out", str(tmp_path / "gptq")])
    assert result.exit_code == 0 and "note: transformers and GPTQModel load this mixture of experts" in result.output
    assert "| load with | vLLM (`vllm serve DIR`); transformers and GPTQModel" in (tmp_path / "gptq" / "README.md").read_text()


def test_export_names_the_linear_whose_shape_the_format_cannot_store(tiny_llama_dir: Path, tmp_path: Path) -> None:
    _run("quantize", tiny_llama_dir, "--method", "rtn", "--out", tmp_path / "bundle", "--group-size", 64, "--no-progress")
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "bundle"), "--format", "compressed-tensors",
                                      "--out", str(tmp_path / "ct")])
    assert result.exit_code == 2, result.output
    assert "model.layers.0." in result.output and "multiple of the group size" in result.output
    assert not (tmp_path / "ct").exists()


def test_export_directory_has_a_card_and_a_manifest_that_inspect_verifies(tiny_llama_dir: Path, tmp_path: Path) -> None:
    _run("quantize", tiny_llama_dir, "--method", "rtn", "--out", tmp_path / "bundle", "--group-size", 32, "--no-progress")
    _run("export", tmp_path / "bundle", "--format", "compressed-tensors", "--out", tmp_path / "ct")
    manifest = json.loads((tmp_path / "ct" / "manifest.json").read_text())
    assert manifest["format"] == "compressed-tensors" and "config.json" in manifest["files"]
    assert "compressed-tensors" in (tmp_path / "ct" / "README.md").read_text()
    assert "verified" in _run("inspect", tmp_path / "ct")
    stray = tmp_path / "ct" / "generation_config.extra.json"  # a file the manifest does not list fails too
    stray.write_text("{}")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "ct")])
    assert result.exit_code == 1 and "generation_config.extra.json (not in the manifest)" in result.output, result.output
    stray.unlink()
    (tmp_path / "ct" / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # a Hub download's own files
    (tmp_path / "ct" / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / "ct" / ".cache" / "huggingface" / "download.lock").write_text("")
    assert "verified" in _run("inspect", tmp_path / "ct")
    shard = next((tmp_path / "ct").glob("model*.safetensors"))
    with open(shard, "r+b") as handle:  # flip one byte of tensor data
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "ct")])
    assert result.exit_code == 1 and shard.name in result.output
