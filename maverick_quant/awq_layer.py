"""AWQ on one decoder layer: search per-channel scales, fold them, clip, in place.

For each scaling group of the layer's plan (input norm -> q/k/v, v -> o where shapes
allow, post-attention norm -> gate/up, up -> down), in order:
  1. one pass over the calibration windows records mean|x| of the group's input and an
     evenly strided sample of x (the pass stops at the group);
  2. `compress.awq.search_scales` picks s minimising the group's output error on the sample
     under round-to-nearest (s = 1, plain RTN, is among the candidates);
  3. s is folded: the producer (norm weight, or linear output rows) is divided by s, the
     group's linears' columns multiplied by s; the float layer computes the same function.
Then, with clipping on, one more pass samples each group's (now scaled) input and each
linear's weight is clipped per (row, group). The layer is left holding the scaled, clipped
float weights: RTN (`awq`) or GPTQ (`awq+gptq`) quantizes them next.

Mixture-of-experts blocks are scaled by awq_moe.py (their groups are left out of the plan).
"""

from __future__ import annotations

import torch

from maverick_quant.arch.base import LayerPlan, ScaleGroup
from maverick_quant.calibration.capture import capture_samples
from maverick_quant.compress.awq import (clip_weights, sample_stride, duo_weight_mean, fold_into_norm, fold_into_previous_linear, output_loss,
                                         scale_columns, search_scales)
from maverick_quant.groups import linear_grid, quantized_linears, shipped_grid
from maverick_quant.recipe import QuantizeSpec
from maverick_quant.streaming import StreamingModel


def _stride(hidden: torch.Tensor, tokens: int) -> int:
    return sample_stride(hidden.shape[0] * hidden.shape[1], tokens)


def _weights(layer: torch.nn.Module, names: tuple[str, ...]) -> list[torch.Tensor]:
    return [layer.get_submodule(name).weight.data.float() for name in names]


def as_stored(layer: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` rounded to the dtype the bundle will store it in (the checkpoint's, e.g. bf16),
    so calibration runs with the float weights that are actually shipped."""
    return tensor.to(getattr(layer, "storage_dtype", tensor.dtype)).to(tensor.dtype)


def fold_into_stored_norm(layer: torch.nn.Module, norm: torch.nn.Module, scales: torch.Tensor) -> torch.Tensor:
    """Fold s [D] into `norm`'s weight, which stays float in the bundle and so is stored rounded
    (w' = as_stored(w / s), bf16 for Maverick); returns the scale that rounding realised,
    s' = w / w' (s where w' = 0) [D] fp32. Consumers scaled by s' compute exactly what they
    computed before the fold; scaled by s they would be off by up to 2^-9 per channel."""
    before = norm.weight.data.float()
    norm.weight.data = as_stored(layer, fold_into_norm(norm.weight.data, scales))
    after = norm.weight.data.float()
    return torch.where(after != 0, before / after, scales.float())


def apply_scales(layer: torch.nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Fold s into the producer and multiply the consumers' input columns by s (in place); a
    norm producer is stored rounded, and its consumers take the scale it realised."""
    prev = layer.get_submodule(group.prev)
    if group.prev_norm:
        scales = fold_into_stored_norm(layer, prev, scales)
    else:
        prev.weight.data = fold_into_previous_linear(prev.weight.data, scales)
    for name in group.linears:
        module = layer.get_submodule(name)
        module.weight.data = scale_columns(module.weight.data, scales)


@torch.no_grad()
def awq_scale_layer(model: StreamingModel, layer: torch.nn.Module, hidden: torch.Tensor, plan: LayerPlan,
                    spec: QuantizeSpec) -> dict[str, dict]:
    """Scale (and clip) the float weights of `layer` in place; returns per-group search stats."""
    stats, stride = {}, _stride(hidden, spec.awq.sample_tokens)
    for group in plan.scale_groups:
        with capture_samples(layer, (group.linears[0],), stride, stop=True) as samples:
            model.feed_layer(layer, hidden)
        sample = samples[group.linears[0]]
        weights = _weights(layer, group.linears)
        duo = duo_weight_mean(weights, spec.weights) if spec.awq.duo_scaling else None
        grids = [shipped_grid(layer, name, spec) for name in group.linears]  # None: kept float, never rounded
        result = search_scales(sample.mean_abs, duo, output_loss(sample.sample, weights, grids), spec.awq)
        apply_scales(layer, group, result.scales)
        stats[f"awq:{group.prev}"] = {"ratio": result.ratio, "rtn_loss": result.rtn_loss,
                                      "loss": float(result.losses.min())}
    if spec.awq.clip and plan.scale_groups:
        clip_layer(model, layer, hidden, plan, spec, stride)
    return stats


def clip_layer(model: StreamingModel, layer: torch.nn.Module, hidden: torch.Tensor, plan: LayerPlan,
               spec: QuantizeSpec, stride: int) -> None:
    """Clip every linear of the scaling groups on a sample of its (scaled) input."""
    firsts = tuple(group.linears[0] for group in plan.scale_groups)
    with capture_samples(layer, firsts, stride, stop=True) as samples:  # groups are in forward order
        model.feed_layer(layer, hidden)
    for group in plan.scale_groups:
        x = samples[group.linears[0]].sample
        for name in quantized_linears(layer, group.linears):  # a linear kept in float keeps its range
            if name in group.unclipped:
                continue
            module = layer.get_submodule(name)
            module.weight.data = clip_weights(module.weight.data, x, linear_grid(layer, name, spec), spec.awq).to(module.weight.dtype)
