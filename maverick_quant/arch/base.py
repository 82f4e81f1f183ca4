"""Architecture tables: data that says which tensors of a decoder layer are what.

A table names, relative to a decoder layer, the linear weights to quantize grouped by the
input they share (one Hessian per group), the tensors that pass through unquantized, the
mixture-of-experts block if the layer has one, and the model-level tensors (embeddings,
final norm, lm_head, other towers). The engine never branches on model classes: it reads
these tables through `ArchTable.plan(config, layer_index)`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
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
class ScaleGroup:
    """AWQ: linears whose shared input is produced by `prev`, so a per-channel scale s can be
    folded into `prev` (a norm's weight, or a linear's output rows) and W diag(s) into them.

    prev:       module path of the producer ("input_layernorm", "mlp.up_proj").
    linears:    the consumers, relative to the layer.
    prev_norm:  whether `prev` is a norm (weight [K]) rather than a linear (weight [K, K_in]).
    unclipped:  consumers AWQ's clip search leaves alone: attention's q and k, whose error
                reaches the model through the q.k product, not their own outputs (the AWQ
                reference implementations skip them for that reason).
    """

    prev: str
    linears: tuple[str, ...]
    prev_norm: bool = True
    unclipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertLinear:
    """One per-expert linear stored inside a fused, input-major expert tensor.

    The fused tensor `fused` has shape [E, K, parts * N]; this linear is slice `part`
    along the last dim, transposed: W[e] = fused[e][:, part*N:(part+1)*N].T, shape [N, K]
    (Llama 4: gate_proj = gate_up_proj[e][:, :I].T, up_proj = gate_up_proj[e][:, I:].T,
    down_proj = down_proj[e].T). `name` is the unfused per-expert module name in exports.
    """

    name: str
    fused: str
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class MoEBlock:
    """A routed mixture of experts (Llama 4 style) inside a decoder layer.

    block:        path of the MoE module ("feed_forward"); its input is the routed input x.
    residual_input: path of the module whose input is the residual stream h entering the
                  block (its norm): the layer's output is h + block(x), x = norm(h).
    router:       path of the router linear [E, D] (logits = x W^T).
    experts:      path of the routed experts' module; per-expert exports name its linears
                  "{experts}.{e}.{linear name}".
    shared_module: path of the shared expert (a gated MLP run on x).
    shared:       groups of the always-on shared expert, relative to the decoder layer.
    experts_in:   expert linears reading x * score (gate, up), solved together.
    experts_mid:  expert linears reading act(gate) * up (down).
    num_experts, top_k: routing size. The score sigmoid(logit) multiplies the expert's input.
    """

    block: str
    residual_input: str
    router: str
    experts: str
    shared_module: str
    shared: tuple[LinearGroup, ...]
    experts_in: tuple[ExpertLinear, ...]
    experts_mid: tuple[ExpertLinear, ...]
    num_experts: int
    top_k: int
    activation: str

    @property
    def expert_linears(self) -> tuple[ExpertLinear, ...]:
        return self.experts_in + self.experts_mid

    @property
    def fused_names(self) -> tuple[str, ...]:
        """Relative names of the fused expert tensors ("feed_forward.experts.gate_up_proj")."""
        return tuple(dict.fromkeys(linear.fused for linear in self.expert_linears))


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer holds.

    groups:       dense linear groups solved in this order, before the MoE block if any.
    passthrough:  tensors kept in float (norms, an unquantized router), relative names.
    shapes:       every tensor of the layer, relative name -> shape (fused experts included).
    moe:          the MoE block, or None for a dense layer.
    attention_window: tokens a query may see in this layer (chunked attention), or None.
    scale_groups: AWQ scaling groups in solve order (see ScaleGroup).
    float_in_packed_exports: linears (relative names) that GPTQ / AWQ / compressed-tensors
                  exports write as float `.weight` even when the bundle holds them quantized,
                  because a serving engine reads them right only so (see arch/llama4.py).
    """

    groups: tuple[LinearGroup, ...]
    passthrough: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    moe: MoEBlock | None = None
    attention_window: int | None = None
    scale_groups: tuple[ScaleGroup, ...] = ()
    float_in_packed_exports: tuple[str, ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        """Every dense quantizable linear of the layer (shared expert included), in solve order."""
        shared = self.moe.shared if self.moe else ()
        return tuple(name for group in self.groups + shared for name in group.linears)

    def params_before(self, linear: str | None = None) -> int:
        """Weights of the linears a forward pass computes before `linear` runs: those of the
        groups before the group holding it (a pass that stops at a group's input, as the
        Hessian and AWQ sampling passes do); None: every group's, a whole pass of the layer up
        to its MoE block (if any). `groups` are in forward order."""
        total = 0
        for group in self.groups:
            if linear in group.linears:
                return total
            total += sum(math.prod(self.shapes[name + ".weight"]) for name in group.linears)
        return total

    def attends_before(self, linear: str | None = None) -> bool:
        """Whether a pass computes the attention before `linear` runs: a group whose outputs
        the attention mixes (the values) comes before its group; None: a whole pass."""
        for group in self.groups:
            if linear in group.linears:
                return False
            if group.mixed_by_attention:
                return True
        return linear is None or any(group.mixed_by_attention for group in self.groups)


@dataclass(frozen=True)
class ArchTable:
    """How one decoder-only architecture lays out its tensors.

    architectures:   `config.architectures` values this table serves.
    layer_prefix:    format string of a decoder layer's tensor prefix, e.g. "model.layers.{i}.".
    plan:            (text config, layer index) -> LayerPlan.
    attention:       path of the attention module in a layer (returns (output, weights) in eager mode).
    attention_output: path of its output projection, whose output is the module's output
                     (attention_replay.py replays it on the projection's kept inputs).
    embed, final_norm, lm_head: model-level tensor names (lm_head may be tied to embed).
    build_layer:     (text config, layer_index) -> the transformers decoder-layer module (on meta).
    build_rotary:    text config -> module mapping (hidden, position_ids) to position embeddings.
    build_norm:      text config -> the final norm module (weight loaded by the engine).
    model_shapes:    text config -> {tensor name: shape} for the model-level tensors.
    text_config:     config -> the language model's config (itself for text-only models).
    passthrough_prefixes: model-level tensors copied through untouched whatever their names
                     (a vision tower), checked for readability but not against config shapes.
    text_root:       the prefix of the language model's names that loading its text alone
                     drops ("language_model." of Llama4ForConditionalGeneration, which
                     AutoModelForCausalLM loads as Llama4ForCausalLM: `model.layers.N...`).
    """

    architectures: tuple[str, ...]
    layer_prefix: str
    plan: Callable[[Any, int], LayerPlan]
    attention: str
    attention_output: str
    embed: str
    final_norm: str
    lm_head: str
    build_layer: Callable[[Any, int], torch.nn.Module]
    build_rotary: Callable[[Any], torch.nn.Module]
    build_norm: Callable[[Any], torch.nn.Module]
    model_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    text_config: Callable[[Any], Any] = field(default=lambda config: config)
    passthrough_prefixes: tuple[str, ...] = ()
    text_root: str = ""

    def loader_name(self, name: str) -> str:
        """`name` without `text_root`: the part of a module's name that every way of loading the
        checkpoint ends with, for patterns matched anywhere in a name (a `(.*\\.)?` prefix, or a substring)."""
        return name.removeprefix(self.text_root) if self.text_root else name

    def prefix(self, layer_index: int) -> str:
        return self.layer_prefix.format(i=layer_index)

    def has_moe(self, config: Any) -> bool:
        """Whether any layer of the model `config` describes is a mixture of experts."""
        text = self.text_config(config)
        return any(self.plan(text, i).moe is not None for i in range(text.num_hidden_layers))

    def expected_tensors(self, config: Any) -> dict[str, tuple[int, ...]]:
        """Full tensor name -> shape for the whole model, from config alone."""
        text = self.text_config(config)
        shapes = dict(self.model_shapes(text))
        for i in range(text.num_hidden_layers):
            prefix = self.prefix(i)
            shapes.update({prefix + name: shape for name, shape in self.plan(text, i).shapes.items()})
        return shapes


def unfuse_experts(moe: MoEBlock, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused expert tensors {fused name: [E, K, parts*N]} -> {linear name: W [E, N, K]}."""
    return {linear.name: expert_view(linear, fused[linear.fused]) for linear in moe.expert_linears}


def expert_view(linear: ExpertLinear, fused: torch.Tensor) -> torch.Tensor:
    """Linear `linear`'s weights W [E, N, K] as a view of its fused tensor [E, K, parts*N]."""
    width = fused.shape[-1] // linear.parts
    return fused[..., linear.part * width : (linear.part + 1) * width].transpose(-1, -2)


class FusedExpertsBuilder:
    """Fused expert tensors {fused name: [count, K, parts*N]} filled in place, one piece at a
    time: each piece (some experts of one linear, W [n, N, K]) is copied into its view of the
    fused tensor (`expert_view`), so one copy of the experts and the piece being added are
    alive, instead of three (the pieces, their concatenation, the fused result). A fused
    tensor is allocated, with its first piece's dtype and device, when that piece arrives; the
    caller adds every expert of every linear, then reads `fused`."""

    def __init__(self, moe: MoEBlock, count: int):
        self.moe, self.count = moe, count
        self.fused: dict[str, torch.Tensor] = {}

    def add(self, name: str, first: int, weight: torch.Tensor) -> None:
        """Copy experts [first, first + n) of linear `name`, weight [n, N, K], into place."""
        linear = next(linear for linear in self.moe.expert_linears if linear.name == name)
        if linear.fused not in self.fused:
            n, k = weight.shape[-2:]
            self.fused[linear.fused] = torch.empty((self.count, k, linear.parts * n), dtype=weight.dtype,
                                                   device=weight.device)
        expert_view(linear, self.fused[linear.fused])[first : first + weight.shape[0]].copy_(weight)


@dataclass(frozen=True)
class TransformersModules:
    """Builders of a family's transformers classes, imported on first use (importing
    transformers' modeling files is slow and not needed to read a table).

    module: "transformers.models.llama.modeling_llama"; layer/rotary/norm: class names there.
    """

    module: str
    layer: str
    rotary: str
    norm: str

    def _cls(self, name: str):
        import importlib

        return getattr(importlib.import_module(self.module), name)

    def build_layer(self, config: Any, layer_index: int) -> torch.nn.Module:
        """The decoder layer on the meta device (weights are assigned by the engine)."""
        with torch.device("meta"):
            return self._cls(self.layer)(config, layer_index)

    def build_rotary(self, config: Any) -> torch.nn.Module:
        return self._cls(self.rotary)(config)

    def build_norm(self, config: Any) -> torch.nn.Module:
        return self._cls(self.norm)(config.hidden_size, eps=config.rms_norm_eps)
