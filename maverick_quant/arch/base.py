"""Architecture tables: data that says which tensors of a decoder layer are what.

A table names, relative to a decoder layer, the linear weights to quantize grouped by the
input they share (one Hessian per group), the tensors that pass through unquantized, and
the model-level tensors (embeddings, final norm, lm_head). The engine never branches on
model classes: it reads these tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, so share one Hessian H = E[x x^T].

    name:    a label for reports ("attn_in").
    linears: module paths relative to the decoder layer ("self_attn.q_proj").
    mixed_by_attention: the linears produce attention values (v_proj). Their output reaches
             the rest of the model only through the attention mix o_i = sum_j a_ij W x_j =
             W z_i, so the exact Hessian is per KV head E[z z^T] with z_i = sum_j a_ij x_j,
             not E[x x^T]: the latter under-weights attention-sink tokens that every query
             reads, and GPTQ then ruins exactly those tokens' values.
    """

    name: str
    linears: tuple[str, ...]
    mixed_by_attention: bool = False


@dataclass(frozen=True)
class ArchTable:
    """How one decoder-only architecture lays out its tensors.

    architectures:   `config.architectures` values this table serves.
    layer_prefix:    format string of a decoder layer's tensor prefix, e.g. "model.layers.{i}.".
    groups:          linear groups in the order GPTQ solves them inside a layer (true-sequential).
    layer_passthrough: per-layer tensors kept in float (norm weights), relative to the layer.
    attention:       path of the attention module in a layer (returns (output, weights) in eager mode).
    embed, final_norm, lm_head: model-level tensor names (lm_head may be tied to embed).
    build_layer:     (config, layer_index) -> the transformers decoder-layer module (on meta).
    build_rotary:    config -> module mapping (hidden, position_ids) to (cos, sin).
    build_norm:      config -> the final norm module (weight loaded by the engine).
    layer_shapes:    config -> {relative tensor name: shape} for every tensor of a layer.
    model_shapes:    config -> {tensor name: shape} for the model-level tensors.
    """

    architectures: tuple[str, ...]
    layer_prefix: str
    groups: tuple[LinearGroup, ...]
    layer_passthrough: tuple[str, ...]
    attention: str
    embed: str
    final_norm: str
    lm_head: str
    build_layer: Callable[[Any, int], torch.nn.Module]
    build_rotary: Callable[[Any], torch.nn.Module]
    build_norm: Callable[[Any], torch.nn.Module]
    layer_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    model_shapes: Callable[[Any], dict[str, tuple[int, ...]]]

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear of a layer, in solve order."""
        return tuple(name for group in self.groups for name in group.linears)

    def prefix(self, layer_index: int) -> str:
        return self.layer_prefix.format(i=layer_index)

    def expected_tensors(self, config: Any) -> dict[str, tuple[int, ...]]:
        """Full tensor name -> shape for the whole model, from config alone."""
        shapes = dict(self.model_shapes(config))
        for i in range(config.num_hidden_layers):
            prefix = self.prefix(i)
            shapes.update({prefix + name: shape for name, shape in self.layer_shapes(config).items()})
        return shapes
