"""Llama 4 (`Llama4ForConditionalGeneration`, `Llama4ForCausalLM`) as architecture tables.

Every `interleave_moe_layer_step`-th layer (those in `config.moe_layers`) is a mixture of
experts: a router [E, D] (kept in float by default), a shared expert (a gated MLP of
`intermediate_size`) and E routed experts stored fused and input-major:
`experts.gate_up_proj [E, D, 2I]`, `experts.down_proj [E, I, D]`. Top-k routing with the
sigmoid of the router logit multiplying the expert's INPUT. The other layers have a dense
gated MLP of `intermediate_size_mlp` under `feed_forward`. Rope layers with
`layer_types[i] == "chunked_attention"` attend within chunks of `attention_chunk_size`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maverick_quant.arch.base import ArchTable, ExpertLinear, LayerPlan, LinearGroup, MoEBlock, TransformersModules
from maverick_quant.arch.llama import ATTENTION_GROUPS, NORMS, attention_shapes, mlp_shapes, scale_groups
from maverick_quant.errors import InputError

EXPERTS = "feed_forward.experts."
ROUTER = "feed_forward.router"


MODULES = TransformersModules("transformers.models.llama4.modeling_llama4", "Llama4TextDecoderLayer",
                             "Llama4TextRotaryEmbedding", "Llama4TextRMSNorm")


def moe_block(config: Any) -> MoEBlock:
    """The MoE block of a Llama 4 MoE layer (the same for every MoE layer of a model)."""
    return MoEBlock(
        block="feed_forward",
        residual_input="post_attention_layernorm",
        router=ROUTER,
        experts=EXPERTS.rstrip("."),
        shared_module="feed_forward.shared_expert",
        shared=(LinearGroup("shared_in", ("feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj")),
                LinearGroup("shared_mid", ("feed_forward.shared_expert.down_proj",))),
        experts_in=(ExpertLinear("gate_proj", EXPERTS + "gate_up_proj", 0, 2), ExpertLinear("up_proj", EXPERTS + "gate_up_proj", 1, 2)),
        experts_mid=(ExpertLinear("down_proj", EXPERTS + "down_proj"),),
        num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        activation=config.hidden_act,
    )


def is_moe_layer(config: Any, layer_index: int) -> bool:
    return layer_index in (getattr(config, "moe_layers", None) or ())


ROPE_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def float_in_packed_exports(config: Any, layer_index: int) -> tuple[str, ...]:
    """The linears of a layer that vLLM reads right from a packed (GPTQ / AWQ /
    compressed-tensors) checkpoint only as float weights.

    - q/k of a rope layer: Hugging Face stores their rows in interleaved-pair rotary order;
      vLLM runs Llama 4 with neox-style rope and reorders the rows at load time
      (`Llama4ForCausalLM.permute_qk_weight_for_rotary`) only for tensors named `.weight`
      (and NVFP4 scales): packed int4 q/k would keep the wrong order, and every rope layer
      would rotate the wrong pairs. v goes with them: vLLM fuses q/k/v into one module of one
      quantization. NoPE layers (`no_rope_layers[i] == 0`) have no rotary and stay packed.
    - The router: vLLM builds it as a `ReplicatedLinear` without quantization, so packed router
      tensors are names it cannot load.
    """
    rope = bool((getattr(config, "no_rope_layers", None) or [1] * (layer_index + 1))[layer_index])
    return (ROPE_ATTENTION if rope else ()) + ((ROUTER,) if is_moe_layer(config, layer_index) else ())


def _plan(config: Any, layer_index: int) -> LayerPlan:
    hidden = config.hidden_size
    shapes = attention_shapes(config)
    window = None
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer_index] == "chunked_attention":
        window = config.attention_chunk_size
    if not is_moe_layer(config, layer_index):
        shapes.update(mlp_shapes("feed_forward.", hidden, config.intermediate_size_mlp))
        groups = ATTENTION_GROUPS + (
            LinearGroup("mlp_in", ("feed_forward.gate_proj", "feed_forward.up_proj")),
            LinearGroup("mlp_mid", ("feed_forward.down_proj",)),
        )
        return LayerPlan(groups=groups, passthrough=NORMS, shapes=shapes, attention_window=window,
                         scale_groups=scale_groups(config, "feed_forward."),
                         float_in_packed_exports=float_in_packed_exports(config, layer_index))
    experts, inter = config.num_local_experts, config.intermediate_size
    shapes.update(mlp_shapes("feed_forward.shared_expert.", hidden, inter))
    shapes.update({
        ROUTER + ".weight": (experts, hidden),
        EXPERTS + "gate_up_proj": (experts, hidden, 2 * inter),
        EXPERTS + "down_proj": (experts, inter, hidden),
    })
    return LayerPlan(groups=ATTENTION_GROUPS, passthrough=NORMS + (ROUTER + ".weight",), shapes=shapes,
                     moe=moe_block(config), attention_window=window, scale_groups=scale_groups(config, None),
                     float_in_packed_exports=float_in_packed_exports(config, layer_index))


def _model_shapes(prefix: str, lm_head: str) -> Any:
    def shapes(config: Any) -> dict[str, tuple[int, ...]]:
        out = {f"{prefix}embed_tokens.weight": (config.vocab_size, config.hidden_size),
               f"{prefix}norm.weight": (config.hidden_size,)}
        if not getattr(config, "tie_word_embeddings", False):
            out[lm_head] = (config.vocab_size, config.hidden_size)
        return out

    return shapes


def _table(architecture: str, root: str, **extra: Any) -> ArchTable:
    model = f"{root}model."
    return ArchTable(
        architectures=(architecture,),
        layer_prefix=model + "layers.{i}.",
        plan=_plan,
        attention="self_attn",
        attention_output="self_attn.o_proj",
        embed=f"{model}embed_tokens.weight",
        final_norm=f"{model}norm.weight",
        lm_head=f"{root}lm_head.weight",
        build_layer=MODULES.build_layer,
        build_rotary=MODULES.build_rotary,
        build_norm=MODULES.build_norm,
        model_shapes=_model_shapes(model, f"{root}lm_head.weight"),
        **extra,
    )


LLAMA4_CAUSAL = _table("Llama4ForCausalLM", "")
LLAMA4 = _table("Llama4ForConditionalGeneration", "language_model.", text_config=lambda config: config.text_config,
                passthrough_prefixes=("vision_model.", "multi_modal_projector."), text_root="language_model.")


MAVERICK_TEXT = dict(  # Llama-4-Maverick-17B-128E(-Instruct), public config.json
    hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
    intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=128, num_experts_per_tok=1,
    interleave_moe_layer_step=2, vocab_size=202048, max_position_embeddings=1048576, rope_theta=500000.0,
    rms_norm_eps=1e-5, attention_chunk_size=8192, use_qk_norm=False, attn_temperature_tuning=True,
    floor_scale=8192, attn_scale=0.1, hidden_act="silu", tie_word_embeddings=False,
)

def maverick_linear_shapes(text: dict = MAVERICK_TEXT) -> dict[str, tuple[int, int]]:
    """(N outputs, K inputs) of each 4-bit linear in a Maverick layer, fused as the kernels run
    them: q, k and v in one, gate and up side by side (dense MLP and each routed expert)."""
    hidden, heads, head_dim = text["hidden_size"], text["num_attention_heads"], text["head_dim"]
    return {
        "qkv": ((heads + 2 * text["num_key_value_heads"]) * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "mlp gate+up": (2 * text["intermediate_size_mlp"], hidden),
        "mlp down": (hidden, text["intermediate_size_mlp"]),
        "expert gate+up": (2 * text["intermediate_size"], hidden),
        "expert down": (hidden, text["intermediate_size"]),
    }


MAVERICK_VISION = dict(  # its vision tower (passed through untouched; sizes matter for plans only)
    hidden_size=1408, intermediate_size=5632, num_attention_heads=16, num_hidden_layers=34, image_size=336,
    patch_size=14, projector_input_dim=4096, projector_output_dim=4096, vision_output_dim=4096,
    pixel_shuffle_ratio=0.5, norm_eps=1e-5,
)


def maverick_config(**text_overrides: Any):
    """`Llama4Config` of Llama 4 Maverick (text as published; vision tower at its defaults),
    for planning and for tests that need the real tensor layout without the weights.
    `text_overrides` shrink it (fewer layers or experts) while keeping the layout."""
    from transformers import Llama4Config

    text = {**MAVERICK_TEXT, **text_overrides}
    rope_theta = text.pop("rope_theta")
    config = Llama4Config(text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta}},
                          vision_config=MAVERICK_VISION)
    config.architectures = ["Llama4ForConditionalGeneration"]
    return config


LLAMA4_IMAGE_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # transformers' Llama4ImageProcessor defaults


def image_tokens_per_chunk(image_size: int, patch_size: int, shuffle_scale: int) -> int:
    """Image tokens per image_size² chunk: (S/p)² patches, merged sf × sf by the pixel shuffle."""
    return (image_size // patch_size) ** 2 // shuffle_scale ** 2


def mmproj_geometry(config) -> dict[str, int]:
    """llama.cpp's `clip.*` size keys (all uint32) of a Llama 4's vision tower and projector:
    what `export --mmproj` writes and what `validate --mmproj` expects to read back."""
    vision = config.vision_config
    return {"clip.vision.image_size": vision.image_size, "clip.vision.patch_size": vision.patch_size,
            "clip.vision.embedding_length": vision.hidden_size,
            "clip.vision.feed_forward_length": vision.intermediate_size,
            "clip.vision.block_count": vision.num_hidden_layers,
            "clip.vision.attention.head_count": vision.num_attention_heads,
            "clip.vision.projection_dim": config.get_text_config().hidden_size,
            "clip.vision.projector.scale_factor": round(1 / vision.pixel_shuffle_ratio)}


def image_normalisation(root: Path) -> tuple[list[float], list[float], str]:
    """(mean, std, where from): preprocessor_config.json when the model has one, else the
    `image_processor` of processor_config.json (where transformers 5 saves a processor's image
    settings), else Llama 4's processor defaults (0.5 for every channel)."""
    path = root / "preprocessor_config.json"
    if not path.is_file() and (root / "processor_config.json").is_file():
        path = root / "processor_config.json"
    if not path.is_file():
        return (*LLAMA4_IMAGE_MEAN_STD, "Llama 4's processor defaults (no preprocessor_config.json)")
    try:
        config = json.loads(path.read_text())
        config = config["image_processor"] if path.name == "processor_config.json" else config
        mean, std = [float(v) for v in config["image_mean"]], [float(v) for v in config["image_std"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: expected image_mean and image_std lists ({exc})") from None
    if len(mean) != 3 or len(std) != 3:
        raise InputError(f"{path}: image_mean and image_std need 3 values (RGB), got {len(mean)} and {len(std)}")
    return mean, std, str(path.name)
