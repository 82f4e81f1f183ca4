"""Llama 4's vision tower and projector -> llama.cpp's multimodal projector GGUF ("mmproj").

llama.cpp runs a Llama 4 image through a second file beside the text GGUF (`llama-mtmd-cli
-m model.gguf --mmproj mmproj.gguf`): architecture `clip`, projector type `llama4`. The vision
tower passes through our bundle unquantized, so this export is a renaming of float tensors plus
the keys llama.cpp's `clip.cpp` reads:

    v.patch_embd.weight [D, 3·p·p]       the unfold+linear patch embedding, kept 2-D
    v.class_embd [D], v.position_embd.weight [(S/p)² + 1, D]   (the class token comes last)
    v.pre_ln, v.post_ln                  LayerNorms (weight, bias)
    v.blk.N.{attn_q,attn_k,attn_v,attn_out,ffn_up,ffn_down}   linears with biases
    v.blk.N.ln1, v.blk.N.ln2             the block's input and post-attention LayerNorms
    mm.model.mlp.1 / .2                  the pixel-shuffle adapter (GELU after each)
    mm.model.fc [text hidden, P]         the projector into the text model's embedding

Token count per image chunk: (S/p)² · r², r = `pixel_shuffle_ratio` (144 for Maverick).

`ln2` is written where llama.cpp's own converter writes `attn_post_norm`: in gguf-py's tensor
map (0.19.0) a later Gemma 4 entry takes Llama 4's `post_attention_layernorm` over, and clip.cpp
then applies that norm to the attention output and leaves the pre-MLP norm without its affine
weights. The file loads and computes something else; ours computes Hugging Face's function
(tests/test_gguf_mmproj.py runs both through llama.cpp).

Everything is checked when the plan is made, before a byte is written: the vision config
against what clip.cpp's llama4 graph fixes (default rope of theta 10000, 1 / an integer pixel
shuffle, head dims 2-D rope can split), every tensor's name (a bias the graph never adds has no
place either) and the shapes it multiplies unchecked, and the image normalisation. The file
carries what Hugging Face computes: GELU and LayerNorm eps 1e-5, which its vision code fixes
whatever `hidden_act` and `norm_eps` say.

Tensor types follow llama.cpp's converter: every 1-D tensor, the position embedding and the
class token in F32; the patch embedding F16 in an F16 file and F32 otherwise; other matrices in
the requested type (Q8_0 by gguf-py's own quantizer, F16 where K is not a multiple of 32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from maverick_quant.arch.llama4 import image_normalisation, image_tokens_per_chunk, mmproj_geometry
from maverick_quant.compress.gguf_blocks import BLOCK
from maverick_quant.exporters.gguf import TensorJob, float_array, write_gguf_file
from maverick_quant.exporters.gguf_weights import BundleWeights, FloatWeights
from maverick_quant.errors import InputError
from maverick_quant.recipe import MMPROJ_TYPES

# Hugging Face module (under vision_model. / multi_modal_projector.) -> gguf-py MODEL_TENSOR and block id
MODEL_LEVEL = {
    "vision_model.patch_embedding.linear": ("V_ENC_EMBD_PATCH", None),
    "vision_model.class_embedding": ("V_ENC_EMBD_CLS", None),
    "vision_model.positional_embedding_vlm": ("V_ENC_EMBD_POS", None),
    "vision_model.layernorm_pre": ("V_PRE_NORM", None),
    "vision_model.layernorm_post": ("V_POST_NORM", None),
    "vision_model.vision_adapter.mlp.fc1": ("V_MMPROJ_MLP", 1),
    "vision_model.vision_adapter.mlp.fc2": ("V_MMPROJ_MLP", 2),
    "multi_modal_projector.linear_1": ("V_MMPROJ_FC", None),
}
BLOCK_PREFIX = "vision_model.model.layers."
BLOCK_LEVEL = {
    "self_attn.q_proj": "V_ENC_ATTN_Q",
    "self_attn.k_proj": "V_ENC_ATTN_K",
    "self_attn.v_proj": "V_ENC_ATTN_V",
    "self_attn.o_proj": "V_ENC_ATTN_O",
    "input_layernorm": "V_ENC_INPUT_NORM",
    "post_attention_layernorm": "V_ENC_POST_ATTN_NORM",  # ln2 (llama.cpp's converter: attn_post_norm)
    "mlp.fc1": "V_ENC_FFN_UP",
    "mlp.fc2": "V_ENC_FFN_DOWN",
}
PARAMETERS = ("vision_model.class_embedding", "vision_model.positional_embedding_vlm")  # no .weight in HF
F32_TENSORS = ("V_ENC_EMBD_CLS", "V_ENC_EMBD_POS")
VISION_ROPE_THETA = 10000.0  # clip.cpp's llama4 graph fixes it
# Hugging Face's vision LayerNorms are nn.LayerNorm(width) whatever `norm_eps` says, and its
# MLPs nn.GELU() whatever `hidden_act` says: the file carries what HF computes.
HF_LAYERNORM_EPS = 1e-5
NO_BIAS = ("V_ENC_EMBD_PATCH", "V_MMPROJ_MLP", "V_MMPROJ_FC")  # clip.cpp's llama4 graph adds none


def gguf_tensor_name(hf_name: str) -> tuple[str, str] | None:
    """(GGUF name, gguf-py MODEL_TENSOR member) of a vision tensor, or None when llama.cpp's
    llama4 projector has no place for it. Suffixes .weight/.bias are kept; the two bare
    parameters map to `v.class_embd` and `v.position_embd.weight` as llama.cpp names them."""
    import gguf

    module, _, suffix = hf_name.rpartition(".")
    if hf_name in PARAMETERS:
        module, suffix = hf_name, ("weight" if hf_name.endswith("vlm") else "")
    elif suffix not in ("weight", "bias"):
        return None
    if module in MODEL_LEVEL:
        member, bid = MODEL_LEVEL[module]
    elif module.startswith(BLOCK_PREFIX):
        index, _, relative = module[len(BLOCK_PREFIX):].partition(".")
        if relative not in BLOCK_LEVEL or not index.isdigit():
            return None
        member, bid = BLOCK_LEVEL[relative], int(index)
    else:
        return None
    if suffix == "bias" and member in NO_BIAS:
        return None
    base = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, member)].format(bid=bid)
    return (f"{base}.{suffix}" if suffix else base), member


def required_tensors(blocks: int) -> list[str]:
    """The Hugging Face tensors clip.cpp's llama4 graph cannot run without (biases are optional)."""
    names = [f"{module}.weight" for module in MODEL_LEVEL if module not in PARAMETERS] + list(PARAMETERS)
    return names + [f"{BLOCK_PREFIX}{i}.{relative}.weight" for i in range(blocks) for relative in BLOCK_LEVEL]


def check_vision_config(vision, source: Path) -> int:
    """Refuse a vision tower llama.cpp's llama4 graph would compute differently; returns the
    pixel-shuffle scale factor sf = 1 / pixel_shuffle_ratio."""
    where = f"{source}/config.json vision_config"
    ratio = float(vision.pixel_shuffle_ratio)
    scale = round(1.0 / ratio) if ratio > 0 else 0
    side = vision.image_size // vision.patch_size
    problems = []
    rope = getattr(vision, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(vision, "rope_theta", VISION_ROPE_THETA)))
    if theta != VISION_ROPE_THETA or rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters {rope} (llama.cpp: default rope, theta {VISION_ROPE_THETA:g})")
    if scale < 1 or abs(scale * ratio - 1.0) > 1e-6:
        problems.append(f"pixel_shuffle_ratio {ratio} (llama.cpp: 1 / an integer)")
    elif vision.image_size % vision.patch_size or side % scale:
        problems.append(f"image_size {vision.image_size} is not patch_size {vision.patch_size} times a multiple "
                        f"of {scale}")
    if (vision.hidden_size // vision.num_attention_heads) % 4:
        problems.append(f"head dim {vision.hidden_size // vision.num_attention_heads} (2-D rope needs a multiple of 4)")
    if problems:
        raise InputError(f"--mmproj: {where}: llama.cpp's llama4 projector cannot represent " + "; ".join(problems))
    return scale


def tensor_type(member: str, shape: tuple[int, ...], mmproj_type: str) -> str:
    """The GGML type of one tensor, by llama.cpp's converter's rules (see the module docstring)."""
    if len(shape) == 1 or member in F32_TENSORS or member.endswith("_NORM"):
        return "F32"
    if member == "V_ENC_EMBD_PATCH":
        return "F16" if mmproj_type == "F16" else "F32"
    if mmproj_type == "Q8_0" and shape[-1] % BLOCK:
        return "F16"
    return mmproj_type


def tensor_data(tensor: torch.Tensor, ggml_type: str, name: str) -> np.ndarray:
    """The bytes GGUFWriter stores for `tensor` (GGUF name `name`) in `ggml_type` (Q8_0 by
    gguf-py's quantizer)."""
    if ggml_type != "Q8_0":
        return float_array(tensor, ggml_type, name)
    import gguf

    return gguf.quants.quantize(tensor.float().numpy(), gguf.GGMLQuantizationType.Q8_0)


class MMProjPlan:
    """The mmproj tensors of a Llama 4 bundle or float model, in file order, with lazy loaders."""

    def __init__(self, weights: BundleWeights | FloatWeights, mmproj_type: str):
        if mmproj_type not in MMPROJ_TYPES:
            raise InputError(f"--mmproj-type {mmproj_type}: expected one of {list(MMPROJ_TYPES)}")
        self.weights, self.mmproj_type = weights, mmproj_type
        self.config = config = weights.model_config
        self.vision = getattr(config, "vision_config", None)
        if self.vision is None or config.model_type != "llama4":
            raise InputError(f"--mmproj: {weights.root} is not a Llama 4 model with a vision tower "
                             f"(model_type {config.model_type!r})")
        self.text_hidden = config.get_text_config().hidden_size
        self.scale = check_vision_config(self.vision, weights.root)
        self.names = [name for name in weights.model_tensor_names()
                      if name.startswith(("vision_model.", "multi_modal_projector."))]
        missing = sorted(set(required_tensors(self.vision.num_hidden_layers)) - set(self.names))
        if missing:
            raise InputError(f"--mmproj: {weights.root}: the vision tower lacks {len(missing)} tensors llama.cpp "
                             f"needs, e.g. {missing[:3]}")
        self.mean, self.std, self.normalisation = image_normalisation(weights.root)
        self.f16_fallbacks: list[str] = []
        self.jobs = self._jobs()  # every name, shape and type checked before anything is written
        self._check_f16_range()

    @property
    def tokens_per_chunk(self) -> int:
        return image_tokens_per_chunk(self.vision.image_size, self.vision.patch_size, self.scale)

    def _jobs(self) -> list[TensorJob]:
        jobs = []
        for name in self.names:
            mapped = gguf_tensor_name(name)
            if mapped is None:
                raise InputError(f"--mmproj: {name}: llama.cpp's llama4 projector has no tensor for it")
            gguf_name, member = mapped
            shape, _ = self.weights.model_tensor_info(name)
            self._check_shape(name, member, shape)
            ggml_type = tensor_type(member, shape, self.mmproj_type)
            if self.mmproj_type == "Q8_0" and ggml_type == "F16":
                self.f16_fallbacks.append(gguf_name)
            jobs.append(TensorJob(gguf_name, shape, ggml_type,
                                  lambda name=name, ggml_type=ggml_type, gguf_name=gguf_name: tensor_data(
                                      self.weights.model_tensor(name), ggml_type, gguf_name)))
        return jobs

    def _check_f16_range(self) -> None:
        """Every F16 tensor's values are read and refused, naming it, when F16 cannot hold them
        (|x| > 65504 became Inf): `run` makes this plan before its quantize, so a vision tower
        F16 cannot store is found then, not at the export step hours later."""
        for job in self.jobs:
            if job.ggml_type == "F16":
                job.load()

    def _check_shape(self, name: str, member: str, shape: tuple[int, ...]) -> None:
        """The shapes clip.cpp multiplies without checking (a mismatch aborts it, or is silent)."""
        vision, width = self.vision, self.vision.hidden_size
        expected = {
            "V_ENC_EMBD_PATCH": (width, 3 * vision.patch_size ** 2),
            "V_ENC_EMBD_POS": ((vision.image_size // vision.patch_size) ** 2 + 1, width),
            "V_ENC_EMBD_CLS": (width,),
        }.get(member)
        if member == "V_MMPROJ_FC":
            expected = (self.text_hidden, shape[-1])
        if name.endswith("vision_adapter.mlp.fc1.weight"):  # takes the pixel shuffle's sf² · D channels
            expected = (shape[0], width * self.scale ** 2)
        if expected is not None and tuple(shape) != expected:
            raise InputError(f"--mmproj: {name}: shape {list(shape)}, expected {list(expected)} from config.json")


def export_mmproj(plan: MMProjPlan, out_path: Path, show_progress: bool = True) -> int:
    """Write the vision tower and projector of `plan` (a Llama 4 bundle or float model, checked
    when the plan was made) as llama.cpp's mmproj GGUF at `out_path` (under a temporary name,
    renamed when complete); returns the number of tensors written."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    add_mmproj_metadata(writer, plan)
    return write_gguf_file(writer, plan.jobs, Path(out_path), f"export mmproj {plan.mmproj_type}", show_progress)


def add_mmproj_metadata(writer, plan: MMProjPlan) -> None:
    """The keys clip.cpp reads for a llama4 projector (types as gguf-py's writer gives them:
    a key of another type aborts llama.cpp)."""
    import gguf

    file_types = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0"}
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(f"{plan.weights.name} (vision)")
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[plan.mmproj_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.LLAMA4)
    for key, value in mmproj_geometry(plan.config).items():
        writer.add_uint32(key, value)
    writer.add_vision_attention_layernorm_eps(HF_LAYERNORM_EPS)
    writer.add_vision_image_mean(plan.mean)
    writer.add_vision_image_std(plan.std)
    writer.add_vision_use_gelu(True)
