"""Bad input is refused with a clear message, exit code 2 and no partial output."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from maverick_quant.bundle import Bundle
from maverick_quant.checkpoint import DTYPE_SIZES, Checkpoint, read_safetensors_header
from maverick_quant.compress.finite import all_finite
from maverick_quant.cli import cli
from maverick_quant.errors import InputError


@pytest.fixture
def model_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, target)
    return target


def _shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("model-*.safetensors"))


def _quantize_rtn(model_dir: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["quantize", str(model_dir), "--method", "rtn", "--out", str(out), "--no-progress", *extra])


def _assert_refused(result, out: Path, *words: str) -> None:
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output, result.output
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.partial") for p in out.parent.iterdir())


def test_truncated_shard_is_refused(model_copy: Path, tmp_path: Path) -> None:
    shard = _shards(model_copy)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out", shard.name, "truncated")


def test_missing_shard_is_refused(model_copy: Path, tmp_path: Path) -> None:
    shard = _shards(model_copy)[-1]
    shard.unlink()
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out", shard.name, "missing")


def test_index_entry_outside_model_dir_is_refused(model_copy: Path, tmp_path: Path) -> None:
    index_path = model_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out", "outside the model directory")


@pytest.mark.parametrize("weight_map", [["model.embed_tokens.weight"], None])
def test_an_index_whose_weight_map_is_not_an_object_is_refused(model_copy: Path, tmp_path: Path, weight_map) -> None:
    """It was an AttributeError traceback (exit 3)."""
    index_path = model_copy / "model.safetensors.index.json"
    index_path.write_text(json.dumps({"weight_map": weight_map}))
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out", "not a valid safetensors index",
                    "weight_map is a")


def _rewrite_tensor(model_dir: Path, name: str, value: torch.Tensor) -> Path:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = model_dir / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard


def test_wrong_shape_is_refused(model_copy: Path, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_tensor(model_copy, name, torch.zeros(7, 96))
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out", name, "[7, 96]")


def test_a_gptq_export_refuses_a_zero_point_its_v1_format_cannot_store(model_copy: Path, tmp_path: Path) -> None:
    """GPTQ v1 stores zero - 1; its readers add 1 back without wrapping, so zero 0 (stored 15)
    would be read as 16. compressed-tensors stores the same bundle as it is."""
    name = "model.layers.0.self_attn.o_proj.weight"
    weight = Checkpoint(model_copy).get(name).clone()
    weight[5, :32] = torch.linspace(0.01, 1.0, 32)  # no negative range: zero point 0 on an asymmetric grid
    _rewrite_tensor(model_copy, name, weight)
    assert _quantize_rtn(model_copy, tmp_path / "bundle", "--asym", "--group-size", "32").exit_code == 0
    export = ["export", str(tmp_path / "bundle"), "--out"]
    result = CliRunner().invoke(cli, [*export, str(tmp_path / "gptq"), "--format", "gptq"])
    _assert_refused(result, tmp_path / "gptq", "model.layers.0.self_attn.o_proj", "zero point 0 in 1 of its",
                    "--format compressed-tensors")
    result = CliRunner().invoke(cli, [*export, str(tmp_path / "ct"), "--format", "compressed-tensors"])
    assert result.exit_code == 0, result.output


def test_an_output_that_is_or_holds_an_input_is_refused_even_with_force(model_copy: Path, tmp_path: Path,
                                                                         small_text_file: Path) -> None:
    """A finished run replaces its output: with --out equal to the model (or a folder above it),
    --force would have deleted the model after the run."""
    assert _quantize_rtn(model_copy, tmp_path / "bundle").exit_code == 0
    shards = {p.name: p.stat().st_size for p in _shards(model_copy)}
    model, bundle, text = str(model_copy), str(tmp_path / "bundle"), str(small_text_file)
    commands = {
        "MODEL_DIR": ["quantize", model, "--method", "rtn", "--out", model],
        "MODEL_DIR ": ["quantize", model, "--method", "rtn", "--out", str(tmp_path)],  # a folder above the model
        "MODEL_DIR  ": ["calibrate", model, "--data", text, "--out", model],
        "BUNDLE_DIR": ["export", bundle, "--format", "gptq", "--out", bundle],
        "--candidate": ["validate", "--reference", model, "--candidate", bundle, "--data", text, "--report", bundle],
    }
    for name, command in commands.items():
        result = CliRunner().invoke(cli, [*command, "--force", "--no-progress"] if command[0] != "export"
                                    else [*command, "--force"])
        assert result.exit_code == 2 and f"the input {name.strip()}" in result.output, (command, result.output)
    assert {p.name: p.stat().st_size for p in _shards(model_copy)} == shards
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    inside = CliRunner().invoke(cli, ["export", bundle, "--format", "gptq", "--out", f"{bundle}/layers", "--force"])
    assert inside.exit_code == 2 and "inside the input BUNDLE_DIR" in inside.output, inside.output
    # a new folder inside the bundle: it no longer matched its manifest, and `inspect` failed on it
    inside = CliRunner().invoke(cli, ["export", bundle, "--format", "gptq", "--out", f"{bundle}/gptq"])
    assert inside.exit_code == 2 and "inside the input BUNDLE_DIR" in inside.output, inside.output
    report = ["validate", "--reference", model, "--candidate", bundle, "--data", text, "--report", f"{model}/report"]
    inside = CliRunner().invoke(cli, [*report, "--no-progress"])
    assert inside.exit_code == 2 and "inside the input --reference" in inside.output, inside.output
    assert not (tmp_path / "bundle" / "gptq").exists() and not (model_copy / "report").exists()
    assert CliRunner().invoke(cli, ["inspect", bundle]).exit_code == 0
    assert Bundle(tmp_path / "bundle").num_layers > 0


def test_a_hugging_face_cache_snapshot_of_linked_shards_opens_and_an_escaping_index_is_refused(
        tiny_llama_dir: Path, tmp_path: Path) -> None:
    """In `snapshot_download`'s layout each shard is a link to ../../blobs/<sha256>, outside the
    snapshot folder: the index is checked by name (no absolute path, no ..), not by link target."""
    snapshot, blobs = tmp_path / "hub" / "snapshots" / "rev", tmp_path / "hub" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in tiny_llama_dir.iterdir():
        if file.suffix == ".safetensors":
            shutil.copy(file, blobs / file.name)
            (snapshot / file.name).symlink_to(Path("..", "..", "blobs", file.name))
        else:
            shutil.copy(file, snapshot / file.name)
    checkpoint = Checkpoint(snapshot)
    name = "model.embed_tokens.weight"
    assert torch.equal(checkpoint.get(name), Checkpoint(tiny_llama_dir).get(name))
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "../../blobs/" + index["weight_map"][name]
    (snapshot / "model.safetensors.index.json").unlink()
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="points outside the model directory"):
        Checkpoint(snapshot)


def test_the_fingerprint_tells_a_fine_tune_of_the_same_layout_apart(model_copy: Path) -> None:
    """Same config, names, shapes and offsets (so the same headers), other weights: a resumed run
    must not take it for the model it started on (the fingerprint samples tensor data)."""
    before = Checkpoint(model_copy).fingerprint()
    assert Checkpoint(model_copy).fingerprint() == before
    shard = _shards(model_copy)[0]
    tensors = load_file(str(shard))
    header = shard.read_bytes()[: 8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]]
    save_file({name: t * 1.01 for name, t in tensors.items()}, str(shard), metadata={"format": "pt"})
    assert shard.read_bytes().startswith(header)  # the same header bytes: only the sampled data tells them apart
    assert Checkpoint(model_copy).fingerprint() != before


def _patch_first_value(model_dir: Path, name: str, value: float) -> float:
    """Overwrite the first element of fp32 tensor `name` in its shard, in place (as a disk
    error would, or a mend of one); returns the value it held."""
    shard = model_dir / json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"][name]
    info = read_safetensors_header(shard)[name]
    assert info.dtype == "F32"
    offset = info.begin  # absolute, header included
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        old = struct.unpack("<f", handle.read(4))[0]
        handle.seek(offset)
        handle.write(struct.pack("<f", value))
    return old


def _tensor(model_dir: Path, name: str) -> torch.Tensor:
    return load_file(str(model_dir / json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"][name]))[name]


def test_nan_weights_are_refused_and_the_finished_layers_kept(model_copy: Path, tiny_llama_dir: Path,
                                                              tmp_path: Path, monkeypatch) -> None:
    """A NaN in layer 2's shard is refused naming the file, tensor and layer; layers 0-1, done
    already (hours on Maverick), are kept: once the shard is mended, --resume finishes the run
    into the bundle a run on the sound model makes (a NaN in layer 0: nothing to keep)."""
    # the run's identity samples 64 KiB of each shard at three places, which on Maverick's 5 GB shards
    # rarely covers one bad value; in these tiny shards it covers everything, so sample 16 bytes here
    whole_fingerprint = Checkpoint.fingerprint
    monkeypatch.setattr(Checkpoint, "fingerprint", lambda self, sample_bytes=16: whole_fingerprint(self, 16))
    name = "model.layers.2.self_attn.v_proj.weight"
    sound = _patch_first_value(model_copy, name, float("nan"))  # in place: the shard keeps its size and header
    result = _quantize_rtn(model_copy, tmp_path / "out")
    assert result.exit_code == 2 and name in result.output and "NaN" in result.output, result.output
    assert "(in layer 2); the finished layers 0-1 are kept: mend it, then --resume" in result.output
    _patch_first_value(model_copy, name, sound)
    resumed = _quantize_rtn(model_copy, tmp_path / "out", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert _quantize_rtn(tiny_llama_dir, tmp_path / "whole").exit_code == 0
    for index in range(3):
        ours, whole = Bundle(tmp_path / "out").layer_tensors(index), Bundle(tmp_path / "whole").layer_tensors(index)
        assert all(torch.equal(ours[key], whole[key]) for key in whole)
    first = "model.layers.0.self_attn.v_proj.weight"
    broken = _tensor(model_copy, first)
    broken[0, 0] = float("nan")
    _rewrite_tensor(model_copy, first, broken)
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out0"), tmp_path / "out0", first, "NaN", "(in layer 0)")


def test_inputs_whose_hessian_overflows_are_refused_naming_the_linears(model_copy: Path, small_text_file: Path,
                                                                       tmp_path: Path) -> None:
    """Finite activations too large for fp32 outer products (layer 1's input norm x 1e20): GPTQ's
    solver raised a ValueError naming nothing (exit 3); now exit 2 naming the linears and layer,
    with layer 0 kept."""
    name = "model.layers.1.input_layernorm.weight"
    _rewrite_tensor(model_copy, name, _tensor(model_copy, name) * 1e20)
    result = CliRunner().invoke(cli, ["quantize", str(model_copy), "--data", str(small_text_file), "--samples", "2",
                                      "--seq-len", "16", "--group-size", "32", "--out", str(tmp_path / "out"),
                                      "--no-progress"])
    assert result.exit_code == 2, result.output
    assert ("self_attn.q_proj/self_attn.k_proj: the Hessian of their inputs overflowed to NaN/Inf"
            in result.output), result.output
    assert "(in layer 1); the finished layer 0 is kept" in result.output


def test_a_reference_whose_activations_overflow_is_refused_naming_the_layer(model_copy: Path, tiny_llama_dir: Path,
                                                                             small_text_file: Path, tmp_path: Path) -> None:
    """Finite weights whose activations overflow fp32 (layer 1's gate/up x 1e21): the reference's
    logits went NaN, every KL term counted 0, and kl.mean<=0.01 passed with exit 0."""
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        _rewrite_tensor(model_copy, name, _tensor(model_copy, name) * 1e21)
    assert _quantize_rtn(tiny_llama_dir, tmp_path / "bundle").exit_code == 0
    result = CliRunner().invoke(cli, ["validate", "--reference", str(model_copy), "--candidate", str(tmp_path / "bundle"),
                                      "--data", str(small_text_file), "--ctx", "16", "--max-windows", "2",
                                      "--gate", "kl.mean<=0.01", "--report", str(tmp_path / "report"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "the reference's hidden states became NaN/Inf at the output of layer 1" in result.output
    assert "(in layer 1); the finished layer 0 is kept" in result.output  # for --resume, once the model is mended
    assert not (tmp_path / "report").exists()


def test_a_nan_in_the_reference_head_is_refused_before_the_first_layer(model_copy: Path, tiny_llama_dir: Path,
                                                                       small_text_file: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """The final norm (and lm_head) are used after the last layer: a NaN there was found only then."""
    import maverick_quant.validation.evaluate as evaluate

    weight = _tensor(model_copy, "model.norm.weight")
    weight[3] = float("nan")
    _rewrite_tensor(model_copy, "model.norm.weight", weight)
    assert _quantize_rtn(tiny_llama_dir, tmp_path / "bundle").exit_code == 0
    monkeypatch.setattr(evaluate, "_advance_layer", lambda *args: pytest.fail("a layer ran"))
    result = CliRunner().invoke(cli, ["validate", "--reference", str(model_copy), "--candidate", str(tmp_path / "bundle"),
                                      "--data", str(small_text_file), "--ctx", "16", "--max-windows", "2",
                                      "--report", str(tmp_path / "report"), "--no-progress"])
    assert result.exit_code == 2 and "tensor 'model.norm.weight' contains NaN or Inf values" in result.output, result.output


def _add_tensor(model_dir: Path, name: str, value: torch.Tensor, beside: str) -> None:
    """Store a new tensor `name` in the shard that holds `beside`, and in the index."""
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    _rewrite_tensor(model_dir, beside, _tensor(model_dir, beside))  # the shard, unchanged ...
    shard = model_dir / index["weight_map"][beside]
    tensors = load_file(str(shard))
    tensors[name] = value  # ... and the new tensor beside it
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"][name] = shard.name
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("case", ["fewer-layers", "bias", "inv-freq"])
def test_tensors_config_json_does_not_describe_are_refused_not_dropped(case: str, model_copy: Path, tmp_path: Path) -> None:
    """A checkpoint with a layer more than num_hidden_layers, or a q_proj bias config.json does
    not declare, was quantized without them (exit 0): another function than the one shipped.
    Rotary inv_freq buffers (older Llama checkpoints) are recomputed by every loader: accepted."""
    config = json.loads((model_copy / "config.json").read_text())
    if case == "fewer-layers":
        config["num_hidden_layers"] -= 1
        (model_copy / "config.json").write_text(json.dumps(config))
        last = config["num_hidden_layers"]
        words = ("tensors that config.json does not describe would be dropped", f"model.layers.{last}.")
    else:
        name = "model.layers.0.self_attn." + ("q_proj.bias" if case == "bias" else "rotary_emb.inv_freq")
        _add_tensor(model_copy, name, torch.ones(8), beside="model.layers.0.self_attn.q_proj.weight")
        words = ("1 tensors that config.json does not describe would be dropped: model.layers.0.self_attn.q_proj.bias",)
    result = _quantize_rtn(model_copy, tmp_path / "out")
    if case == "inv-freq":
        assert result.exit_code == 0, result.output
    else:
        _assert_refused(result, tmp_path / "out", *words)


def test_a_stored_head_under_tie_word_embeddings_must_equal_the_embedding(model_copy: Path, tmp_path: Path) -> None:
    """tie_word_embeddings with a stored lm_head: engines run the embedding, we ran the stored
    head, so a differing one validated another model than the one served; an equal one is fine."""
    config = json.loads((model_copy / "config.json").read_text())
    embed = _tensor(model_copy, "model.embed_tokens.weight")
    if config.get("tie_word_embeddings"):
        _add_tensor(model_copy, "lm_head.weight", embed * 2, beside="model.embed_tokens.weight")
    else:
        config["tie_word_embeddings"] = True
        (model_copy / "config.json").write_text(json.dumps(config))
        _rewrite_tensor(model_copy, "lm_head.weight", embed * 2)
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out",
                    "ties the output head to the embedding (tie_word_embeddings), but 'lm_head.weight' is stored and differs")
    _rewrite_tensor(model_copy, "lm_head.weight", embed)
    assert _quantize_rtn(model_copy, tmp_path / "out").exit_code == 0


def test_a_checkpoint_quantized_already_is_refused_naming_its_method(model_copy: Path, tmp_path: Path) -> None:
    """Meta's FP8 Maverick (and GPTQ / compressed-tensors checkpoints) were refused with lines of
    dtype or missing-tensor complaints that never said why."""
    config = json.loads((model_copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    (model_copy / "config.json").write_text(json.dumps(config))
    assert _quantize_rtn(model_copy, tmp_path / "float").exit_code == 0  # float tensors under it (dequantized): read
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_tensor(model_copy, name, _tensor(model_copy, name).to(torch.float8_e4m3fn))
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out",
                    "the model is quantized already (quantization_config, quant_method fbgemm_fp8)", "F8_E4M3")


def test_existing_output_needs_force(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = _quantize_rtn(tiny_llama_dir, out)
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    result = _quantize_rtn(tiny_llama_dir, out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (model_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    _assert_refused(_quantize_rtn(model_dir, tmp_path / "out"), tmp_path / "out", "pickle", "pytorch_model.bin")


def test_unknown_architecture_is_refused(model_copy: Path, tmp_path: Path) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["MysteryForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out", "MysteryForCausalLM", "not supported")


def test_header_reader_reports_shapes(tiny_llama_dir: Path) -> None:
    checkpoint = Checkpoint(tiny_llama_dir)
    info = checkpoint.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert info.shape == (96, 96) and info.dtype == "F32"
    assert read_safetensors_header(info.file)["model.layers.0.self_attn.q_proj.weight"].shape == (96, 96)


def test_garbage_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 4)
    with pytest.raises(InputError, match="corrupt"):
        read_safetensors_header(path)


def test_embedding_rows_read_only_what_is_asked(tiny_llama_dir: Path) -> None:
    checkpoint = Checkpoint(tiny_llama_dir)
    full = checkpoint.get("model.embed_tokens.weight")
    rows = torch.tensor([0, 1, 2, 7, 9, 10, full.shape[0] - 1])  # runs of consecutive rows and gaps
    assert torch.equal(checkpoint.get_rows("model.embed_tokens.weight", rows), full[rows])
    with pytest.raises(InputError, match="row index out of range"):
        checkpoint.get_rows("model.embed_tokens.weight", torch.tensor([full.shape[0]]))


def test_rows_are_read_whole_when_the_os_returns_short_reads(tiny_llama_dir: Path, monkeypatch) -> None:
    """Linux moves at most ~2 GiB per preadv, network file systems less: a short read is not the
    end of the file (a 13-expert chunk of Maverick's gate_up_proj is 2.18 GB in one run of rows)."""
    import os

    checkpoint = Checkpoint(tiny_llama_dir)
    full = checkpoint.get("model.embed_tokens.weight")
    real_preadv, calls = os.preadv, []

    def preadv_at_most_100_bytes(fd, buffers, offset):
        calls.append(offset)
        return real_preadv(fd, [buffers[0][:100]], offset)

    monkeypatch.setattr(os, "preadv", preadv_at_most_100_bytes)
    rows = torch.arange(3, full.shape[0])  # one run of consecutive rows
    assert torch.equal(checkpoint.get_rows("model.embed_tokens.weight", rows), full[rows])
    assert len(calls) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_a_nan_or_inf_anywhere(dtype: torch.dtype) -> None:
    """Anywhere: the first element, one inside the vectorized body, the last of an odd-sized
    tail, in a transposed (non-contiguous) view; and a NaN beside an Inf."""
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(4097, generator=generator).to(dtype)
    assert all_finite(tensor)
    for position in (0, 1000, 4096):
        for bad in (float("nan"), float("inf"), -float("inf")):
            spoiled = tensor.clone()
            spoiled[position] = bad
            assert not all_finite(spoiled), (position, bad)
    view = torch.randn(64, 100, generator=generator).to(dtype).t()
    assert all_finite(view)
    view[3, 5] = float("nan")
    assert not all_finite(view)
    both = tensor.clone()
    both[[7, 9]] = torch.tensor([float("inf"), float("nan")], dtype=dtype)
    assert not all_finite(both)
    assert all_finite(torch.tensor([1, 2, 3])) and all_finite(torch.empty(0, dtype=dtype))  # integers, nothing


def test_dtype_that_disagrees_with_config_is_refused(model_copy: Path, tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite_tensor(model_copy, name, torch.zeros(96, 96, dtype=torch.bfloat16))
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out", name, "BF16, config.json says")


def test_f32_norms_beside_bf16_matrices_are_read(model_copy: Path, tmp_path: Path) -> None:
    """A bf16 release that stores its norm weights in F32 (transformers loads it) was refused;
    its matrices must still be bf16."""
    shards = {}
    for name, tensor in {name: _tensor(model_copy, name) for name in Checkpoint(model_copy).tensors}.items():
        shards[name] = tensor if tensor.dim() == 1 else tensor.to(torch.bfloat16)
    for name, tensor in shards.items():
        _rewrite_tensor(model_copy, name, tensor)
    config = json.loads((model_copy / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    (model_copy / "config.json").write_text(json.dumps(config))
    assert _quantize_rtn(model_copy, tmp_path / "out").exit_code == 0
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite_tensor(model_copy, name, shards[name].float())
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out2"), tmp_path / "out2", name, "F32, config.json says")


def _valid_shard_bytes() -> bytes:
    from safetensors.torch import save

    return save({"a.weight": torch.zeros(4, 8), "b.bias": torch.ones(3, dtype=torch.float16)}, metadata={"format": "pt"})


_HEADER_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                           st.text(max_size=8), st.lists(st.integers(-5, 2**40), max_size=4),
                           st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "Q4_0", ""]))


@st.composite
def mangled_shards(draw) -> bytes:
    """A valid two-tensor shard, then its header JSON mangled (fields replaced, removed, added),
    its length prefix changed, or its bytes flipped or cut."""
    raw = _valid_shard_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    kind = draw(st.sampled_from(["field", "drop", "extra", "length", "flip", "cut"]))
    if kind in ("field", "drop", "extra"):
        tensor = draw(st.sampled_from(["a.weight", "b.bias"]))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if kind == "field":
            header[tensor][key] = draw(_HEADER_VALUES)
        elif kind == "drop":
            del header[tensor][key]
        else:
            header[draw(st.text(max_size=6))] = draw(st.one_of(_HEADER_VALUES, st.dictionaries(st.text(max_size=4), _HEADER_VALUES)))
        body = json.dumps(header).encode()
        return struct.pack("<Q", len(body)) + body + data
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    if kind == "flip":
        position = draw(st.integers(0, 8 + length - 1))
        return raw[:position] + bytes([raw[position] ^ draw(st.integers(1, 255))]) + raw[position + 1 :]
    return raw[: draw(st.integers(0, len(raw) - 1))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shard=mangled_shards())
def test_mangled_safetensors_headers_give_a_clean_error_never_a_traceback(tmp_path: Path, shard: bytes) -> None:
    """Every mangled shard is either read consistently (each tensor's bytes within the file,
    matching its shape) or refused with an InputError naming the file."""
    path = tmp_path / "shard.safetensors"
    path.write_bytes(shard)
    try:
        infos = read_safetensors_header(path)
    except InputError as exc:
        assert str(path) in str(exc)
        return
    for info in infos.values():
        numel = 1
        for dim in info.shape:
            assert dim >= 0
            numel *= dim
        assert 0 <= info.begin <= info.end <= len(shard) and info.end - info.begin == numel * DTYPE_SIZES[info.dtype]
    spans = sorted((info.begin, info.end) for info in infos.values())
    assert all(end == begin for (_, end), (begin, _) in zip(spans, spans[1:])), spans  # no shared bytes, no gaps
    assert not spans or spans[-1][1] == len(shard)


@pytest.mark.parametrize("offsets, words", [({"a": [0, 8], "b": [0, 8], "c": [16, 24]}, "'b' byte range 0..8 overlaps"),
                                            ({"a": [0, 8], "b": [16, 24], "c": [24, 32]}, "'b' byte range 16..24 leaves "
                                                                                         "unexplained bytes before it")])
def test_tensors_that_share_bytes_or_leave_gaps_are_refused(tmp_path: Path, offsets: dict, words: str) -> None:
    """The header's byte ranges must tile the data section, as safetensors itself requires:
    two tensors over the same bytes would silently read the same values."""
    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": span} for name, span in offsets.items()}
    body = json.dumps(header).encode()
    path = tmp_path / "shard.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(max(end for _, end in offsets.values())))
    with pytest.raises(InputError, match=f"shard.safetensors: corrupt safetensors file: tensor {words}"):
        read_safetensors_header(path)


def test_a_tensor_stored_twice_or_indexed_but_in_no_shard_is_refused(model_copy: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    index_path = model_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = _shards(model_copy)[:2]
    stray = next(iter(load_file(first)))
    save_file({**load_file(second), stray: load_file(first)[stray]}, second, metadata={"format": "pt"})
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out",
                    f"tensor {stray!r} is stored twice, in {first.name} and in {second.name}")
    save_file({k: v for k, v in load_file(second).items() if k != stray}, second, metadata={"format": "pt"})
    index["weight_map"]["vision_model.extra.weight"] = second.name
    index_path.write_text(json.dumps(index))
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out",
                    "1 tensors it indexes are in no shard (e.g. 'vision_model.extra.weight', indexed in")


def test_a_finished_directory_is_flushed_file_by_file_before_it_is_renamed(tmp_path: Path, monkeypatch) -> None:
    """durable_replace_dir (the converted-model cache): every file, then the directory, is
    fsync'ed before the rename, and the parent after it."""
    import os

    from maverick_quant.outputs import durable_replace_dir

    staging, target = tmp_path / ".model.partial", tmp_path / "model"
    staging.mkdir()
    for name in ("config.json", "model.safetensors"):
        (staging / name).write_text(name)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    durable_replace_dir(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"] and not staging.exists()
    assert sorted(synced[:2]) == sorted(str(staging / name) for name in ("config.json", "model.safetensors"))
    assert synced[2:] == [str(staging), str(tmp_path)]


@pytest.mark.parametrize("existing", ["file", "dir"])
def test_force_over_an_existing_output_leaves_nothing_of_it_behind(existing: str, tmp_path: Path) -> None:
    """replace_dir moves the old output aside, renames the new one in, then deletes the old: a
    file --force replaced used to stay behind as `.OUT.old-PID` (rmtree cannot remove a file)."""
    from maverick_quant.outputs import replace_dir

    out, finished = tmp_path / "out", tmp_path / ".out.partial"
    out.mkdir() if existing == "dir" else out.write_text("old")
    finished.mkdir()
    (finished / "new.txt").write_text("new")
    replace_dir(finished, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "new.txt").read_text() == "new"


def test_a_bad_model_level_tensor_is_refused_before_the_first_layer(model_copy: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The final norm is written after the last layer; a NaN in it is found before the first
    layer is built, not after hours of work that the refusal would throw away."""
    from maverick_quant.streaming import StreamingModel

    name = "model.norm.weight"
    weight = load_file(str(model_copy / json.loads((model_copy / "model.safetensors.index.json").read_text())["weight_map"][name]))[name]
    weight[3] = float("inf")
    _rewrite_tensor(model_copy, name, weight)
    monkeypatch.setattr(StreamingModel, "layer", lambda *a, **k: pytest.fail("built a layer before refusing"))
    _assert_refused(_quantize_rtn(model_copy, tmp_path / "out"), tmp_path / "out", name, "NaN or Inf")


def test_leftovers_of_a_killed_run_are_named_with_their_size(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A SIGKILL leaves `.OUT.partial-PID` (and `replace_dir` an `.OUT.old-PID`) that no later run
    reuses, with a new PID each try: each run names them and their size, never silently."""
    killed = tmp_path / ".out.partial-4242"
    killed.mkdir()
    (killed / "layer.safetensors").write_bytes(bytes(3 << 20))
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    with pytest.warns(UserWarning, match=r"1 leftovers of earlier runs of out that were stopped hold 3.0 MiB: "
                                         r"\.out\.partial-4242 in "):
        result = CliRunner().invoke(cli, ["calibrate", str(tiny_llama_dir), "--data", str(text), "--out",
                                          str(tmp_path / "out"), "--samples", "2", "--seq-len", "8"])
    assert result.exit_code == 0, result.output
    assert killed.is_dir()  # named, not removed: a run on another host may still own it


def test_force_replaces_only_an_output_of_its_own_kind(tmp_path: Path) -> None:
    """`validate --report FILE --force` replaced a user's file with a report folder, and
    `--report /dev/null --force` replaced the device: a folder output now replaces only a
    folder, a file output only a regular file (here a FIFO stands in for the device)."""
    import os

    from maverick_quant.outputs import check_output_dir
    from maverick_quant.jobs import check_output_file

    victim, pipe, folder = tmp_path / "victim.txt", tmp_path / "pipe", tmp_path / "earlier"
    victim.write_text("keep me")
    os.mkfifo(pipe)
    folder.mkdir()
    check_output_dir(folder, force=True)
    check_output_file(victim, True, "model.gguf")
    for refused, check in ((victim, lambda: check_output_dir(victim, force=True)),
                           (pipe, lambda: check_output_dir(pipe, force=True)),
                           (pipe, lambda: check_output_file(pipe, True, "model.gguf"))):
        with pytest.raises(InputError, match=rf"{refused.name}: exists and is not a"):
            check()
    assert victim.read_text() == "keep me"
