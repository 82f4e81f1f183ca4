"""`export --format gguf --mmproj`: a Llama 4's vision tower and projector as llama.cpp's
multimodal projector GGUF, run by llama.cpp itself (libmtmd through llama-cpp-python) on an
image and compared with Hugging Face's vision forward of the same pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maverick_quant.errors import InputError
from maverick_quant.exporters import gguf_mmproj
from maverick_quant.compress.gguf_blocks import relative_error
from maverick_quant.validation.vision import LlamaCppVision, ReferenceVision, hugging_face_token_order, synthetic_images

from conftest import make_tiny_llama4, require_llama_cpp, run_cli as _run

# 4 x 4 patches of 14, shuffled 2 x 2: four image tokens in a 2 x 2 grid; the adapter takes the
# shuffle's 2² x 32 channels (Hugging Face's forward reads them as intermediate_size)
VISION = {"image_size": 56, "intermediate_size": 128}


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


def test_the_reference_vision_tower_is_hugging_faces_forward(llama4_vision) -> None:
    """validate's reference, loaded tensor by tensor without the text model, computes what
    Hugging Face's whole Llama4ForConditionalGeneration computes for the image."""
    from maverick_quant.streaming import open_source

    image = synthetic_images(1, 56, seed=3)[0]
    ours = ReferenceVision(open_source(llama4_vision["model"])).embeddings(image, [0.5] * 3, [0.5] * 3)
    torch.testing.assert_close(ours, hugging_face_image_embeddings(llama4_vision["model"], image), rtol=1e-5, atol=1e-6)


def llama_cpp_image_embeddings(text_gguf: Path, mmproj: Path, image: np.ndarray) -> torch.Tensor:
    """[tokens, text hidden]: llama.cpp's encoding of `image` (uint8 [H, W, 3]) with our mmproj."""
    with LlamaCppVision(text_gguf, mmproj, hidden=64) as encoder:  # the tiny text model's width
        return encoder.embeddings(image)


@pytest.mark.parametrize("mmproj_type, tolerance", [("F32", 0.005), ("F16", 0.005), ("Q8_0", 0.03)])
def test_llama_cpp_encodes_an_image_with_our_mmproj_as_hugging_face_does(llama4_vision, mmproj_type: str,
                                                                         tolerance: float) -> None:
    """F32: llama.cpp's tanh GELU and fp16 attention against HF's erf GELU in fp32, measured at
    4.9e-4 relative (F16 6.0e-4, Q8_0 1.2e-2); the converter's `attn_post_norm` naming of ln2
    is off by far more (0.64, the next test)."""
    require_llama_cpp()
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
    error = relative_error(hugging_face_token_order(theirs), reference)
    print(f"\nmmproj {mmproj_type}: llama.cpp vs Hugging Face, relative error {error:.2e} "
          f"(rows in HF's order: {relative_error(theirs, reference):.2e})")
    assert error < tolerance
    assert relative_error(theirs, reference) > 10 * error  # the grid really is transposed
    manifest = json.loads((tmp / f"m-{mmproj_type}.gguf.manifest.json").read_text())
    assert set(manifest["files"]) == {text_gguf.name, mmproj.name}


def test_the_converters_attn_post_norm_naming_computes_another_function(llama4_vision, monkeypatch) -> None:
    """What llama.cpp's own converter writes for `post_attention_layernorm` (gguf-py's map):
    llama.cpp loads it without complaint and encodes the image differently."""
    require_llama_cpp()
    import gguf

    converter = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 1).get_name(
        "vision_model.model.layers.0.post_attention_layernorm.weight", try_suffixes=(".weight", ".bias"))
    tmp = llama4_vision["tmp"]
    monkeypatch.setitem(gguf_mmproj.BLOCK_LEVEL, "post_attention_layernorm", "V_ENC_ATTN_POST_NORM")
    assert gguf_mmproj.gguf_tensor_name("vision_model.model.layers.0.post_attention_layernorm.weight")[0] == converter
    code, out = _run("export", llama4_vision["bundle"], "--format", "gguf", "--gguf-type", "Q8_0", "--out",
                     tmp / "c.gguf", "--mmproj", tmp / "mmproj-converter.gguf", "--mmproj-type", "F32", "--no-progress")
    assert code == 0, out
    image = np.random.default_rng(0).integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    theirs = hugging_face_token_order(llama_cpp_image_embeddings(tmp / "c.gguf", tmp / "mmproj-converter.gguf", image))
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
    assert code == 2 and "p.gguf" in out and "--force" in out
    assert not (tmp_path / "m.gguf").exists() and (tmp_path / "p.gguf").read_bytes() == b"keep"
    code, out = _run("export", tiny_llama_dir, "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "d.gguf",
                     "--mmproj", tmp_path / "q.gguf", "--no-progress")
    assert code == 2 and "not a Llama 4 model with a vision tower" in out
    assert not (tmp_path / "d.gguf").exists() and not (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("vision, message", [
    ({"pixel_shuffle_ratio": 0.3}, "pixel_shuffle_ratio 0.3 (llama.cpp: 1 / an integer)"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}, "(llama.cpp: default rope, theta 10000)"),
    ({"hidden_size": 36, "intermediate_size": 144}, "head dim 18 (2-D rope needs a multiple of 4)"),
    ({"image_size": 42}, "image_size 42 is not patch_size 14 times a multiple of 2"),
])
def test_vision_towers_llama_cpp_would_compute_differently_are_refused(vision: dict, message: str) -> None:
    from transformers import Llama4VisionConfig

    from conftest import TINY_LLAMA4_VISION

    with pytest.raises(InputError, match="llama.cpp's llama4 projector cannot represent") as error:
        gguf_mmproj.check_vision_config(Llama4VisionConfig(**{**TINY_LLAMA4_VISION, **VISION, **vision}), Path("m"))
    assert message in str(error.value) and "m/config.json vision_config" in str(error.value)


def test_tensors_llama_cpp_has_no_place_for_and_q8_0s_fallback() -> None:
    for name in ("multi_modal_projector.linear_1.bias", "vision_model.vision_adapter.mlp.fc2.bias",
                 "vision_model.patch_embedding.linear.bias", "vision_model.model.layers.x.mlp.fc1.weight",
                 "vision_model.extra.weight"):
        assert gguf_mmproj.gguf_tensor_name(name) is None, name
    assert gguf_mmproj.tensor_type("V_ENC_ATTN_Q", (40, 40), "Q8_0") == "F16"
    assert gguf_mmproj.tensor_type("V_ENC_ATTN_Q", (40, 64), "Q8_0") == "Q8_0"
    assert gguf_mmproj.tensor_type("V_ENC_EMBD_PATCH", (32, 588), "F16") == "F16"
    assert gguf_mmproj.tensor_type("V_ENC_EMBD_PATCH", (32, 588), "Q8_0") == "F32"
    assert gguf_mmproj.tensor_type("V_ENC_INPUT_NORM", (32,), "F16") == "F32"


def test_a_bad_vision_tower_is_refused_before_the_text_gguf_is_written(smollm2_dir: Path, tmp_path: Path) -> None:
    """Shapes and image normalisation are checked with everything else, before the (for
    Maverick, 200 GB) text GGUF is written."""
    model = make_tiny_llama4(smollm2_dir, tmp_path / "model", attention_chunk_size=8192)  # adapter input 64, not 128
    code, out = _run("export", model, "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "m.gguf",
                     "--mmproj", tmp_path / "p.gguf", "--no-progress")
    assert code == 2 and "vision_adapter.mlp.fc1.weight: shape [32, 64], expected [32, 128]" in out, out
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "p.gguf").exists()
    model = make_tiny_llama4(smollm2_dir, tmp_path / "model2", vision=VISION, attention_chunk_size=8192)
    (model / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5]}))
    code, out = _run("export", model, "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "m.gguf",
                     "--mmproj", tmp_path / "p.gguf", "--no-progress")
    assert code == 2 and "preprocessor_config.json: expected image_mean and image_std" in out, out
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "p.gguf").exists()
    code, out = _run("export", model, "--format", "gguf", "--out", tmp_path / "m.gguf", "--mmproj", tmp_path / "m.gguf")
    assert code == 2 and "the same file as --out" in out
    code, out = _run("export", model, "--format", "gguf", "--out", tmp_path / "m.gguf", "--mmproj-type", "F32")
    assert code == 2 and "--mmproj-type without --mmproj" in out


def test_a_recipe_writes_the_mmproj_beside_its_gguf_and_validates_with_it(llama4_vision, small_text_file: Path,
                                                                         tmp_path: Path) -> None:
    """`exports: [{format: gguf, mmproj: F32}]`: the run's projector file is byte for byte the
    one `export --mmproj` makes (the vision tower passes through any quantization method), and
    the GGUF candidate's validation compares its image embeddings (gate on them)."""
    import yaml

    require_llama_cpp()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(llama4_vision["model"]), "quantize": {"method": "rtn", "gguf_grid": "Q8_0"},
        "exports": [{"format": "gguf", "gguf_type": "Q8_0", "mmproj": "F32"}],
        "validation": {"data": str(small_text_file), "ctx": 32, "max_windows": 2, "candidates": ["model-q8_0.gguf"],
                       "gates": ["vision.rel_error.max<=0.005"]}}))
    code, out = _run("run", recipe, "--out", tmp_path / "run", "--no-progress")
    assert code == 0, out
    code, out = _run("export", llama4_vision["bundle"], "--format", "gguf", "--gguf-type", "Q8_0", "--out",
                     tmp_path / "m.gguf", "--mmproj", tmp_path / "mmproj.gguf", "--mmproj-type", "F32", "--no-progress")
    assert code == 0, out
    assert (tmp_path / "run" / "mmproj-f32.gguf").read_bytes() == (tmp_path / "mmproj.gguf").read_bytes()
    manifest = json.loads((tmp_path / "run" / "model-q8_0.gguf.manifest.json").read_text())
    assert "mmproj-f32.gguf" in manifest["files"]
    vision = json.loads((tmp_path / "run" / "report-model-q8_0.gguf" / "report.json").read_text())["vision"]
    assert vision["images"] == 8 and vision["mmproj"].endswith("mmproj-f32.gguf")
    code, out = _run("inspect", tmp_path / "run" / "mmproj-f32.gguf")  # verified by the GGUF's manifest
    assert code == 0 and "llama4 projector: 56-pixel images, patch 14, 4 tokens per image chunk" in out, out
    assert "verified" in out
    with open(tmp_path / "run" / "mmproj-f32.gguf", "ab") as file:
        file.write(b"\0")
    code, out = _run("inspect", tmp_path / "run" / "mmproj-f32.gguf")
    assert code == 1 and "mmproj-f32.gguf" in out, out


def test_the_models_image_normalisation_travels_through_the_bundle_into_the_mmproj(smollm2_dir: Path,
                                                                                    tmp_path: Path) -> None:
    import gguf

    model = make_tiny_llama4(smollm2_dir, tmp_path / "model", vision=VISION, attention_chunk_size=8192,
                             intermediate_size_mlp=64)
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


def test_the_image_normalisation_is_read_from_processor_config_json_too(tmp_path: Path) -> None:
    """transformers 5 saves a processor's image settings in processor_config.json: a re-saved
    Llama 4 with its own mean/std silently got 0.5."""
    from maverick_quant.arch.llama4 import LLAMA4_IMAGE_MEAN_STD, image_normalisation

    assert image_normalisation(tmp_path)[:2] == tuple(LLAMA4_IMAGE_MEAN_STD)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {
        "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}}))
    assert image_normalisation(tmp_path) == ([0.48, 0.46, 0.41], [0.27, 0.26, 0.28], "processor_config.json")


class MetaWeights:
    """The exporter's view of a model built on the meta device: names and shapes, no data."""

    def __init__(self, config, root: Path):
        from transformers import Llama4ForConditionalGeneration

        with torch.device("meta"):
            model = Llama4ForConditionalGeneration(config)
        self.root, self.name, self.model_config = root, "maverick", config
        self.infos = {name: (tuple(p.shape), p.dtype) for name, p in model.state_dict().items()
                      if name.startswith(("vision_model.", "multi_modal_projector."))}

    def model_tensor_names(self) -> list[str]:
        return list(self.infos)

    def model_tensor_info(self, name: str):
        return self.infos[name]


def test_maverick_vision_tower_maps_onto_llama_cpps_projector(tmp_path: Path) -> None:
    """Every tensor of Maverick's vision tower (its config, meta tensors) has its llama.cpp
    name, its shape passes the checks, and an image chunk is 144 tokens, as llama.cpp says."""
    from maverick_quant.arch.llama4 import maverick_config

    weights = MetaWeights(maverick_config(num_hidden_layers=2), tmp_path)
    plan = gguf_mmproj.MMProjPlan(weights, "Q8_0")
    jobs = {job.name: job for job in plan.jobs}
    assert plan.scale == 2 and plan.tokens_per_chunk == 144
    assert len(jobs) == len(weights.infos) == 10 + 34 * 16
    assert jobs["mm.model.fc.weight"].shape == (5120, 4096) and jobs["mm.model.fc.weight"].ggml_type == "Q8_0"
    assert jobs["v.patch_embd.weight"].ggml_type == "F32" and jobs["v.position_embd.weight"].ggml_type == "F32"
    assert jobs["v.blk.33.ln2.weight"].ggml_type == "F32" and plan.f16_fallbacks == []


def test_a_recipe_mmproj_on_a_model_without_a_vision_tower_is_refused_before_any_work(tiny_llama_dir: Path,
                                                                                      tmp_path: Path) -> None:
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "quantize": {"method": "rtn", "gguf_grid": "Q8_0"},
                                      "exports": [{"format": "gguf", "gguf_type": "Q8_0", "mmproj": "F16"}]}))
    code, out = _run("run", recipe, "--out", tmp_path / "run", "--no-progress")
    assert code == 2 and "not a Llama 4 model with a vision tower" in out
    assert not (tmp_path / "run").exists()


def _validate_vision(reference: Path, text: Path, gguf_path: Path, mmproj: Path, report: Path, *extra,
                     images: int = 2) -> tuple[int, str]:
    """`validate` of a GGUF + mmproj on a window or two of `text`, gated on the image embeddings."""
    return _run("validate", "--reference", reference, "--data", text, "--ctx", 32, "--max-windows", 1,
                "--vision-images", images, "--gate", "vision.rel_error.max<=0.005", "--no-progress",
                "--candidate", gguf_path, "--mmproj", mmproj, "--report", report, *extra)


def test_validate_gates_a_gguf_candidates_image_embeddings(llama4_vision, small_text_file: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    """`validate --mmproj`: llama.cpp's image embeddings against the reference's vision tower,
    in the report and its gates; the converter's ln2 naming fails the gate; images from a
    folder (RGBA and grayscale too) are made image_size square first."""
    require_llama_cpp()
    from PIL import Image

    model, bundle = llama4_vision["model"], llama4_vision["bundle"]
    for name, post_norm in (("ours", "V_ENC_POST_ATTN_NORM"), ("converter", "V_ENC_ATTN_POST_NORM")):
        monkeypatch.setitem(gguf_mmproj.BLOCK_LEVEL, "post_attention_layernorm", post_norm)
        code, out = _run("export", bundle, "--format", "gguf", "--gguf-type", "Q8_0", "--out", tmp_path / f"{name}.gguf",
                         "--mmproj", tmp_path / f"mmproj-{name}.gguf", "--mmproj-type", "F32", "--no-progress")
        assert code == 0, out
    code, out = _validate_vision(model, small_text_file, tmp_path / "ours.gguf", tmp_path / "mmproj-ours.gguf",
                                 tmp_path / "r-ours")
    assert code == 0, out
    report = json.loads((tmp_path / "r-ours" / "report.json").read_text())
    assert report["vision"]["images"] == 2 and report["vision"]["tokens_per_image"] == 4
    assert report["vision"]["rel_error"]["max"] < 0.005
    assert "## Vision" in (tmp_path / "r-ours" / "report.md").read_text()
    code, out = _validate_vision(model, small_text_file, tmp_path / "converter.gguf", tmp_path / "mmproj-converter.gguf",
                                 tmp_path / "r-converter")
    assert code == 1 and "gate vision.rel_error.max<=0.005: FAIL" in out, out
    (tmp_path / "images").mkdir()
    for index, (size, mode) in enumerate([((80, 60), "RGBA"), ((30, 56), "L")]):
        image = Image.fromarray(synthetic_images(1, 90, seed=index)[0]).resize(size).convert(mode)
        image.save(tmp_path / "images" / f"{index}.png")
    code, out = _validate_vision(model, small_text_file, tmp_path / "ours.gguf", tmp_path / "mmproj-ours.gguf",
                                 tmp_path / "r-images", "--images", tmp_path / "images")
    assert code == 0, out
    assert json.loads((tmp_path / "r-images" / "report.json").read_text())["vision"]["images"] == 2


def test_validate_uses_the_models_image_normalisation_and_reports_a_file_that_differs(llama4_vision,
                                                                                      small_text_file: Path,
                                                                                      tmp_path: Path) -> None:
    """A reference with its own mean/std (preprocessor_config.json): the projector file made
    from it agrees; one made without it (0.5) fails the gate, and report.md says why."""
    require_llama_cpp()
    import shutil

    plain = tmp_path / "plain.gguf"
    code, out = _run("export", llama4_vision["model"], "--format", "gguf", "--gguf-type", "F32", "--out", plain,
                     "--mmproj", tmp_path / "mmproj-plain.gguf", "--mmproj-type", "F32", "--no-progress")
    assert code == 0, out
    model = shutil.copytree(llama4_vision["model"], tmp_path / "model")
    (model / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.48, 0.46, 0.41],
                                                                "image_std": [0.27, 0.26, 0.28]}))
    code, out = _run("export", model, "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "own.gguf",
                     "--mmproj", tmp_path / "mmproj-own.gguf", "--mmproj-type", "F32", "--no-progress")
    assert code == 0, out
    code, out = _validate_vision(model, small_text_file, tmp_path / "own.gguf", tmp_path / "mmproj-own.gguf",
                                 tmp_path / "r-own", images=1)
    assert code == 0, out  # 0.48 read back from the file's float32 is the same normalisation, and not flagged
    assert "The image normalisation differs" not in (tmp_path / "r-own" / "report.md").read_text()
    code, out = _validate_vision(model, small_text_file, plain, tmp_path / "mmproj-plain.gguf", tmp_path / "r-plain",
                                 images=1)
    assert code == 1, out
    assert "The image normalisation differs" in (tmp_path / "r-plain" / "report.md").read_text()


def test_validate_refuses_an_mmproj_without_its_gguf(llama4_vision, small_text_file: Path, tmp_path: Path) -> None:
    mmproj = tmp_path / "p.gguf"
    mmproj.write_bytes(b"x")
    common = ["--reference", llama4_vision["model"], "--data", small_text_file, "--ctx", 32, "--max-windows", 2,
              "--no-progress"]
    code, out = _run("validate", *common, "--candidate", llama4_vision["bundle"], "--mmproj", mmproj,
                     "--report", tmp_path / "r")
    assert code == 2 and "the candidate must be the GGUF file it goes with" in out
    assert not (tmp_path / "r").exists()
    code, out = _run("validate", *common, "--candidate", llama4_vision["bundle"], "--images", tmp_path,
                     "--report", tmp_path / "r")
    assert code == 2 and "--images / --vision-images without --mmproj" in out
    text_gguf = tmp_path / "m.gguf"  # a GGUF that is not a projector file: refused before the evaluation
    code, out = _run("export", llama4_vision["bundle"], "--format", "gguf", "--gguf-type", "Q8_0", "--out", text_gguf,
                     "--no-progress")
    assert code == 0, out
    code, out = _run("validate", *common, "--candidate", text_gguf, "--mmproj", text_gguf, "--report", tmp_path / "r")
    assert code == 2 and "not the projector of this reference" in out and "'llama4' (the reference: 'clip')" in out
    assert not (tmp_path / "r").exists()


def test_a_vision_tower_f16_cannot_hold_is_refused_before_a_recipes_quantize(llama4_vision, tmp_path: Path) -> None:
    """A vision weight past F16's 65504 (stored as Inf) was found at the export step, after the
    whole quantize; `run` now refuses it before any work, naming the tensor, and F32 runs."""
    import shutil

    import yaml

    from test_checkpoint import _rewrite_tensor

    model = tmp_path / "model"
    shutil.copytree(llama4_vision["model"], model)
    name = "vision_model.model.layers.0.self_attn.q_proj.weight"
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors.torch import load_file

    weight = load_file(str(model / index[name]))[name]
    weight[0, 0] = 1e5
    _rewrite_tensor(model, name, weight)
    outputs = {}
    for mmproj in ("F16", "F32"):
        recipe = tmp_path / f"{mmproj}.yaml"
        recipe.write_text(yaml.safe_dump({"model": str(model), "quantize": {"method": "rtn", "gguf_grid": "Q8_0"},
                                          "exports": [{"format": "gguf", "gguf_type": "Q8_0", "mmproj": mmproj}]}))
        outputs[mmproj] = _run("run", recipe, "--out", tmp_path / mmproj, "--no-progress")
    code, out = outputs["F16"]
    assert code == 2 and "values of magnitude up to 1e+05 exceed F16's 65504" in out, out
    assert "v.blk.0.attn_q.weight" in out and not (tmp_path / "F16").exists()
    assert outputs["F32"][0] == 0, outputs["F32"][1]
