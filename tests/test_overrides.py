"""Per-module overrides: `keep_float` patterns leave linears unquantized, in the model's float
dtype, and `bits_overrides` put linears on a grid of another width, through the solvers, the
bundle, every export and the clients that read them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from maverick_quant.bundle import Bundle
from maverick_quant.errors import InputError
from maverick_quant.exporters.gguf import rotary_row_permutation
from maverick_quant.exporters.registry import open_export
from maverick_quant.recipe_file import parse_recipe
from maverick_quant.streaming import open_source

from conftest import bundle_logits, make_tiny_llama4, model_logits, run_cli as _run

KEEP = (r"layers\.1\.self_attn\.(q|k|v)_proj", r"mlp\.down_proj")


def _keep_args(patterns=KEEP) -> list[str]:
    return [arg for pattern in patterns for arg in ("--keep-float", pattern)]


@pytest.fixture(scope="module")
def kept_bundle(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    """GPTQ on Q4_0's grid with layer 1's q/k/v and every down_proj kept in float."""
    root = tmp_path_factory.mktemp("keep")
    text = root / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code, out = _run("quantize", tiny_llama_dir, "--data", text, "--out", root / "bundle", "--samples", 4, "--seq-len", 32,
                     "--gguf-grid", "Q4_0", *_keep_args(), "--no-progress")
    assert code == 0, out
    return root / "bundle"


def _is_kept(name: str) -> bool:
    return name.endswith("mlp.down_proj") or name.startswith("self_attn.") and name[-6:] in ("q_proj", "k_proj", "v_proj")


def test_kept_linears_are_the_source_weights_and_the_rest_is_quantized(kept_bundle: Path, tiny_llama_dir: Path) -> None:
    bundle, source = Bundle(kept_bundle), open_source(tiny_llama_dir)
    for index in range(bundle.num_layers):
        quantized, floats = bundle.quantized_layer(index)
        original = source.layer_tensors(index)
        kept = [name for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
                if name == "mlp.down_proj" or (index == 1 and _is_kept(name))]
        assert sorted(bundle.kept_float(index)) == sorted(kept)
        assert set(quantized).isdisjoint(kept) and len(quantized) == 7 - len(kept)
        for name in kept:
            assert torch.equal(floats[f"{name}.weight"], original[f"{name}.weight"]), (index, name)
        for name, weight in quantized.items():
            assert not torch.equal(weight.dequantize(), original[f"{name}.weight"].float())


def test_gguf_stores_kept_linears_as_float_in_llama_cpp_row_order(kept_bundle: Path, tiny_llama_dir: Path,
                                                                  tmp_path: Path) -> None:
    import gguf

    code, out = _run("export", kept_bundle, "--format", "gguf", "--gguf-type", "Q4_0", "--out", tmp_path / "m.gguf")
    assert code == 0 and "re-quantized" not in out, out
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    source = open_source(tiny_llama_dir).layer_tensors(1)
    q = source["self_attn.q_proj.weight"]
    assert tensors["blk.1.attn_q.weight"].tensor_type.name == "F32"
    stored = np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(q.shape)
    assert np.array_equal(stored, q[rotary_row_permutation(q.shape[0], 4)].numpy())
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(source["mlp.down_proj.weight"].shape),
                          source["mlp.down_proj.weight"].numpy())
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_0"


def test_transformers_loads_the_compressed_tensors_export_with_kept_linears_ignored(
        kept_bundle: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The kept modules are in `ignore` (and `modules_to_not_convert` for GPTQ): transformers +
    compressed-tensors leave them plain Linear layers with our float weights and give the
    bundle's logits; our own readers of both exports give the bundle's tensors."""
    from transformers import CompressedTensorsConfig

    bundle = Bundle(kept_bundle)
    for fmt in ("compressed-tensors", "gptq"):
        code, out = _run("export", kept_bundle, "--format", fmt, "--out", tmp_path / fmt)
        assert code == 0, out
        assert "| kept in float | " in (tmp_path / fmt / "README.md").read_text()
        export = open_export(tmp_path / fmt)
        for index in range(bundle.num_layers):
            ours, theirs = bundle.layer_tensors(index), export.layer_tensors(index)
            assert all(torch.equal(ours[name], theirs[name]) for name in ours), (fmt, index)
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.self_attn.q_proj" in config["modules_to_not_convert"]
    assert any("model\\.layers\\.2\\.mlp\\.down_proj" in rule for rule in config["dynamic"])
    # vLLM looks its rules up by the fused module's name: the kept q/k/v of layer 1 are excluded as qkv_proj too
    first = lambda name: next(rule for rule in config["dynamic"] if re.match(rule[2:], name))  # noqa: E731
    assert first("model.layers.1.self_attn.qkv_proj").startswith("-:")
    assert not any(re.match(rule[2:], "model.layers.0.self_attn.qkv_proj") for rule in config["dynamic"])
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    theirs = model_logits(tmp_path / "compressed-tensors", ids, quantization_config=CompressedTensorsConfig(dequantize=True))
    ours = bundle_logits(tiny_llama_dir, bundle, ids, tmp_path / "float")
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_keeping_part_of_a_set_vllm_fuses_is_refused_by_the_vllm_formats(tiny_llama_dir: Path, tmp_path: Path) -> None:
    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--out", tmp_path / "bundle", "--group-size", 32,
                     *_keep_args([r"layers\.0\.self_attn\.q_proj"]), "--no-progress")
    assert code == 0, out
    code, out = _run("export", tmp_path / "bundle", "--format", "gptq", "--out", tmp_path / "gptq")
    assert code == 2 and "model.layers.0.self_attn.q_proj" in out and "k_proj" in out and "vLLM" in out, out
    assert not (tmp_path / "gptq").exists()


def test_bad_or_impossible_keep_float_patterns_are_refused_before_any_work(smollm2_dir: Path, tiny_llama_dir: Path,
                                                                          tmp_path: Path) -> None:
    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--out", tmp_path / "a", *_keep_args(["self_attn("]),
                     "--no-progress")
    assert code == 2 and "keep_float pattern 'self_attn('" in out and not (tmp_path / "a").exists(), out
    llama4 = make_tiny_llama4(smollm2_dir, tmp_path / "llama4")
    code, out = _run("quantize", llama4, "--method", "rtn", "--out", tmp_path / "b", *_keep_args([r"experts\.\d+\.down"]),
                     "--no-progress")
    assert code == 2 and "routed experts" in out and "down_proj" in out and not (tmp_path / "b").exists(), out
    with pytest.raises(InputError, match="quantize.keep_float: expected a list of strings"):
        parse_recipe({"model": "m", "calibration": {"data": "self"}, "quantize": {"keep_float": "self_attn"}})
    recipe = parse_recipe({"model": "m", "calibration": {"data": "self"}, "quantize": {"keep_float": ["self_attn"]},
                           "exports": [{"format": "gguf", "gguf_type": "Q8_0", "requantize": True}]})
    assert recipe.quantize.keeps_float("model.layers.0.self_attn.o_proj") and not recipe.quantize.keeps_float("mlp.up_proj")


def test_the_plan_counts_kept_linears_as_float(tiny_llama_dir: Path, tmp_path: Path) -> None:
    plans = {}
    for name, keep in (("all", []), ("kept", [r"mlp\.down_proj"])):
        code, out = _run("plan", tiny_llama_dir, "--method", "rtn", *_keep_args(keep), "--json", tmp_path / f"{name}.json")
        assert code == 0, out
        plans[name] = json.loads((tmp_path / f"{name}.json").read_text())
    down = 160 * 96 * 4  # fp32 down_proj of each of the 3 layers
    assert plans["kept"]["quantized_tensors"] == plans["all"]["quantized_tensors"] - 3
    assert plans["kept"]["passthrough_bytes"] == plans["all"]["passthrough_bytes"] + 3 * down


OVERRIDE = r"self_attn\.(q|k|v)_proj=8"


@pytest.fixture(scope="module")
def override_bundles(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """GPTQ on Q4_0's grid (group 32, symmetric), with and without q/k/v at 8 bits."""
    root = tmp_path_factory.mktemp("bits")
    text = root / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    bundles = {}
    for name, extra in (("plain", []), ("override", ["--bits-override", OVERRIDE])):
        code, out = _run("quantize", tiny_llama_dir, "--data", text, "--out", root / name, "--samples", 4, "--seq-len", 32,
                         "--gguf-grid", "Q4_0", *extra, "--no-progress")
        assert code == 0, out
        bundles[name] = root / name
    return bundles


def _relative_error(weight, original: torch.Tensor) -> float:
    return float((weight.dequantize() - original.float()).norm() / original.float().norm())


def test_overridden_linears_are_solved_on_their_own_grid(override_bundles: dict[str, Path], tiny_llama_dir: Path) -> None:
    plain, override = Bundle(override_bundles["plain"]), Bundle(override_bundles["override"])
    source = open_source(tiny_llama_dir)
    for index in range(override.num_layers):
        original = source.layer_tensors(index)
        ours, baseline = override.quantized_layer(index)[0], plain.quantized_layer(index)[0]
        for name, weight in ours.items():
            widened = name.split(".")[-1] in ("q_proj", "k_proj", "v_proj")
            assert weight.bits == (8 if widened else 4) and weight.group_size == 32, (index, name)
            assert override.tensor_quant(index, name)["bits"] == weight.bits
            if widened:  # 8 bits: codes use the whole range, and the error is far below 4 bits'
                assert int(weight.codes.max()) > 15
                error, error4 = (_relative_error(w, original[f"{name}.weight"]) for w in (weight, baseline[name]))
                assert error < error4 / 8, (index, name, error, error4)
    assert sorted(override.overridden_grids()) == sorted(f"model.layers.{i}.self_attn.{p}_proj"
                                                           for i in range(override.num_layers) for p in "qkv")
    code, out = _run("inspect", override.root)
    assert code == 0 and "bits overrides: 9 linears at 8 bits" in out, out


def test_gguf_stores_overridden_linears_as_q8_0_exactly(override_bundles: dict[str, Path], tmp_path: Path) -> None:
    import gguf

    code, out = _run("export", override_bundles["override"], "--format", "gguf", "--gguf-type", "Q4_0",
                     "--out", tmp_path / "m.gguf")
    assert code == 0 and "re-quantized" not in out, out
    bundle = Bundle(override_bundles["override"])
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    for gguf_name, name in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"), ("ffn_up", "mlp.up_proj")):
        tensor = tensors[f"blk.1.{gguf_name}.weight"]
        weight = bundle.quantized_layer(1)[0][name].dequantize()
        assert tensor.tensor_type.name == ("Q8_0" if name.endswith("v_proj") else "Q4_0")
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        assert np.array_equal(stored, weight.numpy()), gguf_name


def test_packed_exports_carry_per_module_grids_that_clients_honour(override_bundles: dict[str, Path],
                                                                   tiny_llama_dir: Path, tmp_path: Path) -> None:
    """compressed-tensors gets a second config group naming the 8-bit modules; GPTQ gets
    positive `dynamic` rules (with vLLM's fused qkv_proj name); AWQ, one grid per checkpoint,
    refuses. Our readers give the bundle's tensors back and transformers + compressed-tensors
    computes the bundle's logits. (Loaded compressed, its default: with `dequantize=True`
    transformers 5.25 decompresses every dense module with one scheme, get_dense_scheme.)"""
    bundle = Bundle(override_bundles["override"])
    for fmt in ("compressed-tensors", "gptq"):
        code, out = _run("export", bundle.root, "--format", fmt, "--out", tmp_path / fmt)
        assert code == 0, out
        export = open_export(tmp_path / fmt)
        for index in range(bundle.num_layers):
            ours, theirs = bundle.layer_tensors(index), export.layer_tensors(index)
            assert all(torch.equal(ours[name], theirs[name]) for name in ours), (fmt, index)
    card = (tmp_path / "gptq" / "README.md").read_text()  # the card says which linears are not on the run's grid
    escaped = OVERRIDE.replace("|", "\\|")  # a pipe would end the table cell
    assert f"| 8-bit | {3 * bundle.num_layers} linears matching `{escaped}` (e.g. `model.layers.0.self_attn." in card
    groups = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert groups["group_1"]["weights"]["num_bits"] == 8 and "model.layers.0.self_attn.k_proj" in groups["group_1"]["targets"]
    assert "model.layers.0.self_attn.qkv_proj" in groups["group_1"]["targets"]  # vLLM matches its fused name first
    dynamic = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["dynamic"]
    rule = next(pattern for pattern in dynamic if pattern.startswith("+:") and "layers\\.2\\." in pattern)
    assert dynamic[rule]["bits"] == 8 and re.match(rule[2:], "model.layers.2.self_attn.qkv_proj")
    assert not re.match(rule[2:], "model.layers.2.self_attn.o_proj")
    code, out = _run("export", bundle.root, "--format", "awq", "--out", tmp_path / "awq")
    assert code == 2 and "bits overrides" in out and not (tmp_path / "awq").exists(), out
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(2))
    theirs = model_logits(tmp_path / "compressed-tensors", ids)
    torch.testing.assert_close(theirs, bundle_logits(tiny_llama_dir, bundle, ids, tmp_path / "float"), rtol=1e-4, atol=1e-4)


def test_bits_overrides_that_split_a_fused_set_or_touch_routed_experts_are_refused(
        smollm2_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--out", tmp_path / "bundle", "--group-size", 32,
                     "--bits-override", r"layers\.0\.mlp\.up_proj=8", "--no-progress")
    assert code == 0, out
    code, out = _run("export", tmp_path / "bundle", "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert code == 2 and "model.layers.0.mlp.up_proj: 8-bit" in out and "gate_proj: 4-bit" in out, out
    assert not (tmp_path / "ct").exists()
    llama4 = make_tiny_llama4(smollm2_dir, tmp_path / "llama4")
    for pattern in ("experts=8", r"experts\.5\.=8"):  # the stacked name, or one expert's (not only expert 0's)
        code, out = _run("quantize", llama4, "--method", "rtn", "--out", tmp_path / "b", "--bits-override", pattern,
                         "--no-progress")
        assert code == 2 and "bits_overrides matches the routed experts" in out and not (tmp_path / "b").exists(), out


@pytest.mark.parametrize("entry, message", [("self_attn", "expected REGEX=BITS"), ("self_attn=9", "from 2 to 8, got 9"),
                                            ("self_attn(=8", "not a regular expression"),
                                            ("self_attn=\u00b2", "expected REGEX=BITS")])
def test_bad_bits_overrides_are_refused(entry: str, message: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    code, out = _run("quantize", tiny_llama_dir, "--method", "rtn", "--out", tmp_path / "a", "--bits-override", entry,
                     "--no-progress")
    assert code == 2 and message in out and repr(entry) in out and not (tmp_path / "a").exists(), out
    with pytest.raises(InputError, match=re.escape(message)):
        parse_recipe({"model": "m", "calibration": {"data": "self"}, "quantize": {"bits_overrides": [entry]}})


def test_weights_for_takes_the_first_matching_override_and_q4_k_overrides_get_q8_0s_grid() -> None:
    recipe = parse_recipe({"model": "m", "calibration": {"data": "self"},
                           "quantize": {"gguf_grid": "Q4_K", "bits_overrides": [r"layers\.0\.=4", "self_attn=8"]}})
    spec = recipe.quantize
    assert spec.weights_for("model.layers.1.mlp.up_proj") is spec.weights
    eight = spec.weights_for("model.layers.1.self_attn.q_proj")
    assert (eight.bits, eight.group_size, eight.sym, eight.k_quant, eight.free_min) == (8, 32, True, False, False)
    # the first matching entry wins: 4 bits, the run's own width, so the run's own (Q4_K) grid
    assert spec.weights_for("model.layers.0.self_attn.q_proj") is spec.weights


def test_the_plan_sizes_overridden_linears_on_their_own_grid(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """q/k/v at 8 bits on Q4_0's grid: each of their weights costs 34/32 bytes in the GGUF (Q8_0)
    instead of 18/32, and 1 byte instead of 1/2 in compressed-tensors (fp16 scales per 32 either way)."""
    plans = {}
    for name, extra in (("plain", []), ("override", ["--bits-override", OVERRIDE])):
        code, out = _run("plan", tiny_llama_dir, "--gguf-grid", "Q4_0", *extra, "--json", tmp_path / f"{name}.json")
        assert code == 0, out
        plans[name] = json.loads((tmp_path / f"{name}.json").read_text())
    qkv = 3 * (96 * 96 + 2 * 48 * 96)  # q, k, v weights of the 3 layers
    grown = {fmt: plans["override"]["outputs"][fmt] - plans["plain"]["outputs"][fmt] for fmt in plans["override"]["outputs"]}
    assert grown["gguf Q4_0"] == qkv * 16 // 32 and grown["compressed-tensors"] == qkv // 2, grown
    assert "awq" in plans["plain"]["outputs"] and "awq" not in plans["override"]["outputs"]  # one grid per AWQ checkpoint
    assert plans["override"]["quantized_tensors"] == plans["plain"]["quantized_tensors"]
    code, out = _run("plan", tiny_llama_dir, "--gguf-grid", "Q4_0", "--bits-override", "self_attn=6",
                     "--json", tmp_path / "six.json")
    assert code == 0, out  # no export format stores 6 bits (packs hold 2, 4 or 8): the plan sizes the bundle alone,
    outputs = json.loads((tmp_path / "six.json").read_text())["outputs"]  # as each export would refuse it
    assert list(outputs) == ["bundle"], outputs


def test_the_kernel_runtime_runs_a_bundle_with_8_bit_linears(override_bundles: dict[str, Path], tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    """The 4-bit kernels run the 4-bit linears and the 8-bit ones run as float Linears of their
    values: the model computes the dequantized bundle."""
    from maverick_quant.runtime import QuantLinear, load_quantized_model

    bundle = Bundle(override_bundles["override"])
    model = load_quantized_model(bundle, "reference", torch.float32)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.o_proj, QuantLinear) and not isinstance(attention.q_proj, QuantLinear)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, bundle_logits(tiny_llama_dir, bundle, ids, tmp_path / "float"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt, entry, message", [("awq", "self_attn=8", "stores no other width"),
                                                 ("gguf", "self_attn=6", "(4, 8)"),
                                                 ("gptq", "self_attn=3", "(2, 4, 8)")])
def test_a_recipe_whose_export_cannot_store_an_override_is_refused_on_load(fmt: str, entry: str, message: str) -> None:
    export = {"format": fmt, **({"gguf_type": "Q4_0"} if fmt == "gguf" else {})}
    quantize = {"gguf_grid": "Q4_0"} if fmt == "gguf" else {"group_size": 32, "sym": fmt != "awq"}
    with pytest.raises(InputError, match=re.escape(message)):
        parse_recipe({"model": "m", "calibration": {"data": "self"}, "exports": [export],
                      "quantize": {**quantize, "bits_overrides": [entry]}})


def test_runs_without_overrides_keep_the_identity_they_had_before_overrides_existed() -> None:
    """An unfinished run recorded before bits_overrides existed resumes: the key is absent when unused."""
    from maverick_quant.recipe import QuantizeSpec

    assert "bits_overrides" not in QuantizeSpec().to_dict()
    spec = QuantizeSpec(bits_overrides=("self_attn=8",))
    assert QuantizeSpec.from_dict(spec.to_dict()) == spec


def test_awq_on_a_moe_model_solves_the_shared_expert_on_its_override_grid(smollm2_dir: Path, small_text_file: Path,
                                                                           tmp_path: Path) -> None:
    """AWQ's block search, the shared expert's down scale and its clipping take the shared
    expert's own grid; the routed experts stay on the run's grid."""
    llama4 = make_tiny_llama4(smollm2_dir, tmp_path / "llama4")
    code, out = _run("quantize", llama4, "--method", "awq", "--data", small_text_file, "--samples", 4, "--seq-len", 32,
                     "--group-size", 32, "--bits-override", "shared_expert=8", "--out", tmp_path / "b", "--no-progress")
    assert code == 0, out
    bundle = Bundle(tmp_path / "b")
    moe_layer = next(i for i in range(bundle.num_layers) if bundle.manifest["layers"][i].get("experts"))
    quantized = bundle.quantized_layer(moe_layer)[0]
    shared = {name: w.bits for name, w in quantized.items() if "shared_expert" in name}
    assert len(shared) == 3 and set(shared.values()) == {8}, shared
    assert all(w.bits == 4 for name, w in quantized.items() if "shared_expert" not in name)
    assert all(w.bits == 4 for _, chunk in bundle.expert_chunks(moe_layer) for w in chunk.values())
