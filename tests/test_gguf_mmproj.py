"""`export --format gguf --mmproj`: a Llama 4's vision tower and projector as llama.cpp's
multimodal projector GGUF, run by llama.cpp itself (libmtmd through llama-cpp-python) on an
image and compared with Hugging Face's vision forward of the same pixels."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from maverick_quant.cli import cli
from maverick_quant.errors import InputError
from maverick_quant.exporters import gguf_mmproj

from conftest import make_tiny_llama4

VISION = {"image_size": 56}  # 4 x 4 patches of 14, shuffled 2 x 2: four image tokens in a 2 x 2 grid


def _run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def llama4_vision(smollm2_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama 4 with a 56-pixel vision tower, its Q8_0-grid bundle and the text GGUF."""
    tmp = tmp_path_factory.mktemp("mmproj")
    model = make_tiny_llama4(smollm2_dir, tmp / "model", vision=VISION, attention_chunk_size=8192,
                             intermediate_size_mlp=64)
    text = tmp / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code, out = _run("quantize", model, "--data", text, "--out", tmp / "bundle", "--samples", 2, "--seq-len", 16,
                     "--gguf-grid", "Q8_0", "--no-progress")
    assert code == 0, out
    return {"model": model, "bundle": tmp / "bundle", "tmp": tmp}


def test_every_vision_tensor_of_hugging_faces_llama4_has_its_llama_cpp_name(llama4_vision) -> None:
    from maverick_quant.bundle import Bundle

    names = [n for n in Bundle(llama4_vision["bundle"]).model_tensor_names()
             if n.startswith(("vision_model.", "multi_modal_projector."))]
    mapped = {name: gguf_mmproj.gguf_tensor_name(name) for name in names}
    assert all(mapped.values()), [name for name, value in mapped.items() if value is None]
    gguf_names = [value[0] for value in mapped.values()]
    assert len(set(gguf_names)) == len(gguf_names)
    assert mapped["vision_model.model.layers.0.post_attention_layernorm.weight"][0] == "v.blk.0.ln2.weight"
    assert mapped["multi_modal_projector.linear_1.weight"][0] == "mm.model.fc.weight"
    assert mapped["vision_model.positional_embedding_vlm"][0] == "v.position_embd.weight"
    assert mapped["vision_model.class_embedding"][0] == "v.class_embd"
    assert set(gguf_mmproj.required_tensors(1)) <= set(names)
    assert gguf_mmproj.gguf_tensor_name("vision_model.model.layers.0.mlp.fc3.weight") is None


def hugging_face_image_embeddings(model_dir: Path, image: np.ndarray) -> torch.Tensor:
    """[tokens, text hidden]: Hugging Face's vision tower, adapter and projector on `image`
    (uint8 [S, S, 3], already image_size square: llama.cpp then only normalises it)."""
    from transformers import Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixels = (torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255 - 0.5) / 0.5
    with torch.no_grad():
        return model.get_image_features(pixels).pooler_output.reshape(-1, model.config.text_config.hidden_size)


def llama_cpp_image_embeddings(text_gguf: Path, mmproj: Path, image: np.ndarray) -> torch.Tensor:
    """[tokens, text hidden]: llama.cpp's encoding of `image` (uint8 [H, W, 3]) with our mmproj."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), llama_cpp.llama_model_default_params())
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = False, False, 2
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), model, params)
    assert ctx, f"llama.cpp refused {mmproj}"
    pixels = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
    bitmap = mtmd.mtmd_bitmap_init(image.shape[1], image.shape[0], pixels)
    chunks = mtmd.mtmd_input_chunks_init()
    marker = mtmd.mtmd_default_marker()
    prompt = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
    embeddings = []
    try:
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(prompt), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        hidden = llama_cpp.llama_model_n_embd(model)
        for index in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                out = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(tokens * hidden,))
                embeddings.append(torch.from_numpy(out.copy()).reshape(tokens, hidden))
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llama_cpp.llama_model_free(model)
    return torch.cat(embeddings)


def transposed_token_grid(tokens: torch.Tensor) -> torch.Tensor:
    """llama.cpp's llama4 pixel shuffle lists the merged tokens column by column (its second
    permute is left out); Hugging Face lists them row by row. Same tokens, grid transposed."""
    side = int(round(tokens.shape[0] ** 0.5))
    return tokens.reshape(side, side, -1).transpose(0, 1).reshape(tokens.shape)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


@pytest.mark.parametrize("mmproj_type, tolerance", [("F32", 0.005), ("F16", 0.005), ("Q8_0", 0.03)])
def test_llama_cpp_encodes_an_image_with_our_mmproj_as_hugging_face_does(llama4_vision, mmproj_type: str,
                                                                         tolerance: float) -> None:
    """F32: llama.cpp's tanh GELU and fp16 attention against HF's erf GELU in fp32 measured at
    ~1e-3 relative; the converter's `attn_post_norm` naming of ln2 is off by far more."""
    if os.environ.get("MAVERICK_QUANT_REQUIRE_CLIENTS"):
        import llama_cpp  # noqa: F401
    else:
        pytest.importorskip("llama_cpp")
    tmp = llama4_vision["tmp"]
    text_gguf, mmproj = tmp / f"m-{mmproj_type}.gguf", tmp / f"mmproj-{mmproj_type}.gguf"
    code, out = _run("export", llama4_vision["bundle"], "--format", "gguf", "--gguf-type", "Q8_0", "--out", text_gguf,
                     "--mmproj", mmproj, "--mmproj-type", mmproj_type, "--no-progress")
    assert code == 0, out
    assert "4 tokens per image chunk" in out
    image = np.random.default_rng(0).integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    theirs = llama_cpp_image_embeddings(text_gguf, mmproj, image)
    reference = hugging_face_image_embeddings(llama4_vision["model"], image)
    assert theirs.shape == reference.shape == (4, 64)
    error = relative_error(transposed_token_grid(theirs), reference)
    print(f"\nmmproj {mmproj_type}: llama.cpp vs Hugging Face, relative error {error:.2e} "
          f"(rows in HF's order: {relative_error(theirs, reference):.2e})")
    assert error < tolerance
    assert relative_error(theirs, reference) > 10 * error  # the grid really is transposed
    manifest = json.loads((tmp / f"m-{mmproj_type}.gguf.manifest.json").read_text())
    assert set(manifest["files"]) == {text_gguf.name, mmproj.name}


def test_the_converters_attn_post_norm_naming_computes_another_function(llama4_vision, monkeypatch) -> None:
    """What llama.cpp's own converter writes for `post_attention_layernorm` (gguf-py's map):
    llama.cpp loads it without complaint and encodes the image differently."""
    pytest.importorskip("llama_cpp")
    import gguf

    converter = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 1).get_name(
        "vision_model.model.layers.0.post_attention_layernorm.weight", try_suffixes=(".weight", ".bias"))
    tmp = llama4_vision["tmp"]
    monkeypatch.setitem(gguf_mmproj.BLOCK_LEVEL, "post_attention_layernorm", "V_ENC_ATTN_POST_NORM")
    assert gguf_mmproj.gguf_tensor_name("vision_model.model.layers.0.post_attention_layernorm.weight")[0] == converter
    _run("export", llama4_vision["bundle"], "--format", "gguf", "--gguf-type", "Q8_0", "--out", tmp / "c.gguf",
         "--mmproj", tmp / "mmproj-converter.gguf", "--mmproj-type", "F32", "--no-progress", "--force")
    image = np.random.default_rng(0).integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    theirs = transposed_token_grid(llama_cpp_image_embeddings(tmp / "c.gguf", tmp / "mmproj-converter.gguf", image))
    error = relative_error(theirs, hugging_face_image_embeddings(llama4_vision["model"], image))
    print(f"\nconverter naming ({converter}): relative error {error:.2e}")
    assert error > 0.05


def test_mmproj_refusals_leave_nothing_written(llama4_vision, tiny_llama_dir: Path, tmp_path: Path) -> None:
    bundle = llama4_vision["bundle"]
    code, out = _run("export", bundle, "--format", "gptq", "--out", tmp_path / "g", "--mmproj", tmp_path / "p.gguf")
    assert code == 2 and "--mmproj" in out
    (tmp_path / "p.gguf").write_bytes(b"keep")
    code, out = _run("export", bundle, "--format", "gguf", "--gguf-type", "Q8_0", "--out", tmp_path / "m.gguf",
                     "--mmproj", tmp_path / "p.gguf", "--no-progress")
    assert code != 0 and "p.gguf" in out and "--force" in out
    assert not (tmp_path / "m.gguf").exists() and (tmp_path / "p.gguf").read_bytes() == b"keep"
    code, out = _run("export", tiny_llama_dir, "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "d.gguf",
                     "--mmproj", tmp_path / "q.gguf", "--no-progress")
    assert code != 0 and "not a Llama 4 model with a vision tower" in out
    assert not (tmp_path / "d.gguf").exists() and not (tmp_path / "q.gguf").exists()


def test_a_vision_tower_llama_cpp_would_compute_differently_is_refused(smollm2_dir: Path, tmp_path: Path) -> None:
    model = make_tiny_llama4(smollm2_dir, tmp_path / "model", vision={"hidden_act": "silu"}, attention_chunk_size=8192)
    code, out = _run("export", model, "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "m.gguf",
                     "--mmproj", tmp_path / "p.gguf", "--no-progress")
    assert code != 0 and "hidden_act 'silu'" in out and "config.json" in out
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "p.gguf").exists()


def test_a_recipe_writes_the_mmproj_beside_its_gguf(llama4_vision, tmp_path: Path) -> None:
    """`exports: [{format: gguf, mmproj: F32}]`: the run's projector file is byte for byte the
    one `export --mmproj` makes (the vision tower passes through any quantization method)."""
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(llama4_vision["model"]), "quantize": {"method": "rtn", "gguf_grid": "Q8_0"},
        "exports": [{"format": "gguf", "gguf_type": "Q8_0", "mmproj": "F32"}]}))
    code, out = _run("run", recipe, "--out", tmp_path / "run", "--no-progress")
    assert code == 0, out
    code, out = _run("export", llama4_vision["bundle"], "--format", "gguf", "--gguf-type", "Q8_0", "--out",
                     tmp_path / "m.gguf", "--mmproj", tmp_path / "mmproj.gguf", "--mmproj-type", "F32", "--no-progress")
    assert code == 0, out
    assert (tmp_path / "run" / "mmproj-f32.gguf").read_bytes() == (tmp_path / "mmproj.gguf").read_bytes()
    manifest = json.loads((tmp_path / "run" / "model-q8_0.gguf.manifest.json").read_text())
    assert "mmproj-f32.gguf" in manifest["files"]


def test_the_models_image_normalisation_travels_through_the_bundle_into_the_mmproj(smollm2_dir: Path,
                                                                                    tmp_path: Path) -> None:
    import gguf

    model = make_tiny_llama4(smollm2_dir, tmp_path / "model", attention_chunk_size=8192, intermediate_size_mlp=64)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    (model / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    code, out = _run("quantize", model, "--method", "rtn", "--gguf-grid", "Q8_0", "--out", tmp_path / "bundle",
                     "--no-progress")
    assert code == 0, out
    assert (tmp_path / "bundle" / "preprocessor_config.json").is_file()
    code, out = _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "Q8_0", "--out",
                     tmp_path / "m.gguf", "--mmproj", tmp_path / "p.gguf", "--no-progress")
    assert code == 0 and "image normalisation from preprocessor_config.json" in out, out
    fields = gguf.GGUFReader(tmp_path / "p.gguf").fields
    assert np.allclose(fields["clip.vision.image_mean"].contents(), mean)
    assert np.allclose(fields["clip.vision.image_std"].contents(), std)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5]}))
    with pytest.raises(InputError, match="preprocessor_config.json: expected image_mean and image_std"):
        gguf_mmproj.image_normalisation(tmp_path)
