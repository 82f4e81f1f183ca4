"""The dense Llama family (`LlamaForCausalLM`) as an architecture table."""

from __future__ import annotations

from typing import Any

from maverick_quant.arch.base import ArchTable, LayerPlan, LinearGroup, ScaleGroup, TransformersModules


MODULES = TransformersModules("transformers.models.llama.modeling_llama", "LlamaDecoderLayer",
                             "LlamaRotaryEmbedding", "LlamaRMSNorm")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Shapes [out, in] of the attention projections and the two norms of a Llama-style layer."""
    hidden, head_dim = config.hidden_size, _head_dim(config)
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    return {
        "self_attn.q_proj.weight": (q_out, hidden),
        "self_attn.k_proj.weight": (kv_out, hidden),
        "self_attn.v_proj.weight": (kv_out, hidden),
        "self_attn.o_proj.weight": (hidden, q_out),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }


def mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a gated MLP's gate/up/down weights under `prefix` ("mlp.")."""
    return {f"{prefix}gate_proj.weight": (inter, hidden), f"{prefix}up_proj.weight": (inter, hidden),
            f"{prefix}down_proj.weight": (hidden, inter)}


def _llama_layer_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Shapes [out, in] of one Llama decoder layer's tensors."""
    return {**attention_shapes(config), **mlp_shapes("mlp.", config.hidden_size, config.intermediate_size)}


def _llama_model_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "model.norm.weight": (config.hidden_size,),
    }
    if not getattr(config, "tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


ATTENTION_GROUPS = (
    LinearGroup("attn_qk", ("self_attn.q_proj", "self_attn.k_proj")),
    LinearGroup("attn_v", ("self_attn.v_proj",), mixed_by_attention=True),
    LinearGroup("attn_out", ("self_attn.o_proj",)),
)
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def scale_groups(config: Any, mlp: str | None) -> tuple[ScaleGroup, ...]:
    """AWQ groups of a Llama-style layer: input norm -> q/k/v; v -> o when every query head
    has its own value head (with grouped KV heads v's rows feed several o columns); and for
    a gated MLP under `mlp` ("mlp."): post-attention norm -> gate/up, up -> down."""
    groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         unclipped=("self_attn.q_proj", "self_attn.k_proj"))]
    if config.num_key_value_heads == config.num_attention_heads:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), prev_norm=False))
    if mlp is not None:
        groups += [ScaleGroup("post_attention_layernorm", (f"{mlp}gate_proj", f"{mlp}up_proj")),
                   ScaleGroup(f"{mlp}up_proj", (f"{mlp}down_proj",), prev_norm=False)]
    return tuple(groups)


def _llama_plan(config: Any, layer_index: int) -> LayerPlan:
    groups = ATTENTION_GROUPS + (
        LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
        LinearGroup("mlp_mid", ("mlp.down_proj",)),
    )
    return LayerPlan(groups=groups, passthrough=NORMS, shapes=_llama_layer_shapes(config),
                     scale_groups=scale_groups(config, "mlp."))


LLAMA = ArchTable(
    architectures=("LlamaForCausalLM",),
    layer_prefix="model.layers.{i}.",
    plan=_llama_plan,
    attention="self_attn",
    attention_output="self_attn.o_proj",
    embed="model.embed_tokens.weight",
    final_norm="model.norm.weight",
    lm_head="lm_head.weight",
    build_layer=MODULES.build_layer,
    build_rotary=MODULES.build_rotary,
    build_norm=MODULES.build_norm,
    model_shapes=_llama_model_shapes,
)
