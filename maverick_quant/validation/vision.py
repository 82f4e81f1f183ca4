"""Does a published mmproj see images as the original model does? llama.cpp's encoding of
images (libmtmd, through llama-cpp-python) with the text GGUF + projector file, against the
original checkpoint's vision tower, adapter and projector run in torch on the same pixels.

Images are made `image_size` square here (PIL, bicubic) before either side sees them, so
llama.cpp takes them as one chunk and only normalises them: both sides get the same pixels.
Per image, the error is ||E_llama.cpp - E_ref|| / ||E_ref|| over its [tokens, text hidden]
embedding. llama.cpp's llama4 pixel shuffle lists the merged tokens column by column where
Hugging Face lists them row by row (docs/exports.md); its rows are put back in Hugging Face's
order before comparing, and the report says so.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from maverick_quant.arch.llama4 import image_normalisation, mmproj_geometry
from maverick_quant.compress.gguf_blocks import relative_error
from maverick_quant.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TOKEN_ORDER_NOTE = ("llama.cpp lists an image's merged tokens column by column, Hugging Face row by row: "
                    "compared after putting llama.cpp's in Hugging Face's order")


def synthetic_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """`count` uint8 [size, size, 3] images: smooth random colour fields (8 x 8 colours
    upsampled bilinearly) with a little pixel noise, so patches differ the way photos' do."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        coarse = torch.rand(1, 3, 8, 8, generator=generator)
        smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
        noisy = smooth + 0.05 * torch.randn(smooth.shape, generator=generator)
        images.append((noisy.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy())
    return images


def read_images(folder: Path, count: int, size: int) -> list[np.ndarray]:
    """The first `count` images of `folder` (sorted by name) as RGB uint8 [size, size, 3]."""
    from PIL import Image, UnidentifiedImageError

    paths = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not paths:
        raise InputError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(np.array(image.convert("RGB").resize((size, size), Image.BICUBIC)))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise InputError(f"--images: {path}: not a readable image ({exc})") from None
    return images


def images_sha256(images: list[np.ndarray]) -> str:
    """sha256 of the pixels compared (after the square resize): what a resumed run must see again."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def check_mmproj(mmproj: Path, config) -> dict:
    """Refuse, before any work, a projector file llama.cpp would reject or run on another
    geometry than the reference's (`config`, a Llama4Config); returns its image
    normalisation {"mean", "std"}. Only the header is read."""
    import gguf

    if getattr(config, "vision_config", None) is None:
        raise InputError(f"--mmproj {mmproj}: the reference has no vision tower to compare it with")

    try:
        reader = gguf.GGUFReader(mmproj)
    except (OSError, ValueError) as exc:
        raise InputError(f"--mmproj {mmproj}: not a GGUF file ({exc})") from None
    fields, tensors = reader.fields, {t.name: t for t in reader.tensors}

    def value(key: str):
        return fields[key].contents() if key in fields else None

    expected = {"general.architecture": "clip", "clip.projector_type": "llama4", **mmproj_geometry(config)}
    wrong = [f"{key} {value(key)!r} (the reference: {want!r})" for key, want in expected.items() if value(key) != want]
    fc = tensors.get("mm.model.fc.weight")
    hidden = config.get_text_config().hidden_size
    if fc is None or "v.class_embd" not in tensors:
        wrong.append("no mm.model.fc.weight or v.class_embd tensor")
    elif int(fc.shape[1]) != hidden:  # [K, N], fastest dimension first
        wrong.append(f"mm.model.fc.weight has {int(fc.shape[1])} rows (the text model's width: {hidden})")
    if value("clip.vision.image_mean") is None or value("clip.vision.image_std") is None:
        wrong.append("no clip.vision.image_mean / image_std")
    if wrong:
        raise InputError(f"--mmproj {mmproj}: not the projector of this reference: " + "; ".join(wrong))
    return {"mean": [float(v) for v in value("clip.vision.image_mean")],
            "std": [float(v) for v in value("clip.vision.image_std")]}


class ReferenceVision:
    """The original model's vision tower, adapter and projector, in fp32 on `device`, loaded
    tensor by tensor from its checkpoint (the text model is never read)."""

    def __init__(self, source, device: torch.device | str = "cpu"):
        from transformers.initialization import no_init_weights
        from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

        config = source.checkpoint.load_config()
        self.config, self.device = config, torch.device(device)
        with no_init_weights():  # every parameter is loaded below; the rotary buffers are computed here
            self.tower, self.projector = Llama4VisionModel(config.vision_config), Llama4MultiModalProjector(config)
        self._load(self.tower, "vision_model.", source)
        self._load(self.projector, "multi_modal_projector.", source)

    def _load(self, module: torch.nn.Module, prefix: str, source) -> None:
        tensors = {name: source.checkpoint.get(prefix + name).float() for name in module.state_dict()}
        module.load_state_dict(tensors, assign=True)
        module.float().to(self.device).eval()

    def embeddings(self, image: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
        """[tokens, text hidden] of one image (uint8 [S, S, 3]): normalised per channel,
        (x / 255 - mean) / std, then tower -> adapter -> projector."""
        pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None].to(self.device) / 255
        channel = {"device": self.device, "dtype": torch.float32}
        pixels = (pixels - torch.tensor(mean, **channel)[:, None, None]) / torch.tensor(std, **channel)[:, None, None]
        with torch.no_grad():
            hidden = self.tower(pixels, return_dict=True).last_hidden_state
            return self.projector(hidden).reshape(-1, self.config.get_text_config().hidden_size).cpu()


class LlamaCppVision:
    """llama.cpp's image encoder for a text GGUF + mmproj (libmtmd through llama-cpp-python), on
    the CPU. The text model is opened for its vocabulary and sizes only (mtmd tokenizes the
    image markers and checks the projector's width against it); its weights are not loaded.
    A context manager: `with LlamaCppVision(...) as encoder`. `hidden`: the text model's width,
    the projector's output (check_mmproj checks the file against it)."""

    def __init__(self, text_gguf: Path, mmproj: Path, hidden: int, threads: int | None = None):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self.llama_cpp, self.mtmd, self.ctx = llama_cpp, mtmd, None
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.vocab_only, model_params.n_gpu_layers = True, 0
        self.model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), model_params)
        if not self.model:
            raise InputError(f"{text_gguf}: llama.cpp could not load it")
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.print_timings, params.n_threads = False, False, threads or os.cpu_count() or 1
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.model, params)
        if not self.ctx:
            self.close()
            raise InputError(f"--mmproj {mmproj}: llama.cpp refused it beside {text_gguf} (its log says why)")
        self.hidden = hidden  # a vocab-only model reports no width
        self.where = f"--mmproj {mmproj} beside {text_gguf}"

    def __enter__(self) -> "LlamaCppVision":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def embeddings(self, image: np.ndarray) -> torch.Tensor:
        """[tokens, text hidden] llama.cpp makes of one uint8 [H, W, 3] image (all its chunks)."""
        mtmd = self.mtmd
        pixels = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
        bitmap = mtmd.mtmd_bitmap_init(image.shape[1], image.shape[0], pixels)
        chunks = mtmd.mtmd_input_chunks_init()
        marker = mtmd.mtmd_default_marker()
        prompt = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        try:
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(prompt), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
                raise InputError(f"{self.where}: llama.cpp could not tokenize an image")
            return torch.cat([self._encode(mtmd.mtmd_input_chunks_get(chunks, i))
                              for i in range(mtmd.mtmd_input_chunks_size(chunks))
                              if mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i))
                              == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE])
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _encode(self, chunk) -> torch.Tensor:
        tokens = self.mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        if self.mtmd.mtmd_encode_chunk(self.ctx, chunk):
            raise InputError(f"{self.where}: llama.cpp could not encode an image chunk")
        out = np.ctypeslib.as_array(self.mtmd.mtmd_get_output_embd(self.ctx), shape=(tokens * self.hidden,))
        return torch.from_numpy(out.copy()).reshape(tokens, self.hidden)

    def close(self) -> None:
        """Free the context and the model, once."""
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
        if self.model:
            self.llama_cpp.llama_model_free(self.model)
            self.model = None


def hugging_face_token_order(tokens: torch.Tensor) -> torch.Tensor:
    """llama.cpp's [n², D] image tokens (column by column) in Hugging Face's row-by-row order:
    the n x n grid transposed."""
    side = int(round(tokens.shape[0] ** 0.5))
    if side * side != tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} image tokens do not form a square grid")
    return tokens.reshape(side, side, -1).transpose(0, 1).reshape(tokens.shape)


def vision_agreement(source, text_gguf: Path, mmproj: Path, images: list[np.ndarray], device="cpu",
                     show_progress: bool = True, in_file: dict | None = None) -> dict:
    """The report's `vision` section: per-image relative error of llama.cpp's image embeddings
    (mmproj) against the reference's, its mean and max, tokens per image, and both sides'
    image normalisation (a file whose mean/std differ from the reference's sees other pixels:
    that shows in the error, and the report says where each came from). `in_file`: what
    check_mmproj returned, when the caller has checked the file already."""
    from tqdm.auto import tqdm

    if not images:
        raise InputError("--mmproj: no images to compare")
    config = source.checkpoint.load_config()
    in_file = in_file or check_mmproj(mmproj, config)
    mean, std, where = image_normalisation(source.checkpoint.model_dir)
    reference = ReferenceVision(source, device)
    errors, tokens = [], 0
    with LlamaCppVision(text_gguf, mmproj, config.get_text_config().hidden_size) as encoder:
        for image in tqdm(images, desc="vision", unit="image", disable=not show_progress):
            ours, theirs = reference.embeddings(image, mean, std), encoder.embeddings(image)
            if theirs.shape != ours.shape:
                raise InputError(f"--mmproj {mmproj}: llama.cpp made {list(theirs.shape)} image embeddings, the "
                                 f"reference {list(ours.shape)}")
            errors.append(relative_error(hugging_face_token_order(theirs), ours))
            tokens = ours.shape[0]
    return {"mmproj": str(mmproj), "images": len(images), "tokens_per_image": tokens,
            "rel_error": {"mean": float(np.mean(errors)), "max": float(np.max(errors)), "per_image": errors},
            "normalisation": {"reference": {"mean": mean, "std": std, "from": where}, "mmproj": in_file},
            "token_order": TOKEN_ORDER_NOTE}
