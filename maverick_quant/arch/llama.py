"""The dense Llama family (`LlamaForCausalLM`) as an architecture table."""

from __future__ import annotations

from typing import Any

import torch

from maverick_quant.arch.base import ArchTable, LinearGroup


def _build_llama_layer(config: Any, layer_index: int) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        return LlamaDecoderLayer(config, layer_index)


def _build_llama_rotary(config: Any) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config)


def _build_llama_norm(config: Any) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _llama_layer_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Shapes [out, in] of one Llama decoder layer's tensors."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, _head_dim(config)
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    return {
        "self_attn.q_proj.weight": (q_out, hidden),
        "self_attn.k_proj.weight": (kv_out, hidden),
        "self_attn.v_proj.weight": (kv_out, hidden),
        "self_attn.o_proj.weight": (hidden, q_out),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }


def _llama_model_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "model.norm.weight": (config.hidden_size,),
    }
    if not getattr(config, "tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


LLAMA = ArchTable(
    architectures=("LlamaForCausalLM",),
    layer_prefix="model.layers.{i}.",
    groups=(
        LinearGroup("attn_qk", ("self_attn.q_proj", "self_attn.k_proj")),
        LinearGroup("attn_v", ("self_attn.v_proj",), mixed_by_attention=True),
        LinearGroup("attn_out", ("self_attn.o_proj",)),
        LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
        LinearGroup("mlp_mid", ("mlp.down_proj",)),
    ),
    layer_passthrough=("input_layernorm.weight", "post_attention_layernorm.weight"),
    attention="self_attn",
    embed="model.embed_tokens.weight",
    final_norm="model.norm.weight",
    lm_head="lm_head.weight",
    build_layer=_build_llama_layer,
    build_rotary=_build_llama_rotary,
    build_norm=_build_llama_norm,
    layer_shapes=_llama_layer_shapes,
    model_shapes=_llama_model_shapes,
)
