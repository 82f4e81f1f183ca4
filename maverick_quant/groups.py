"""One linear group of a decoder layer: collect its Hessian by running the layer, solve it.

Shared by the dense path (pipeline.py) and the MoE path (experts.py, expert_solve.py).
"""

from __future__ import annotations

import torch

from maverick_quant.arch.base import LinearGroup
from maverick_quant.errors import ContentError
from maverick_quant.calibration.capture import capture_attention_mixed, capture_inputs
from maverick_quant.compress.finite import all_finite
from maverick_quant.compress.gptq import GPTQResult, gptq_quantize, identity_solve
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.recipe import QuantizeSpec, QuantSpec
from maverick_quant.streaming import StreamingModel


def require_finite_hessian(H: torch.Tensor | None, names: tuple[str, ...]) -> None:
    """ContentError naming the linears `names` when their Hessian H [..., K, K] holds NaN/Inf:
    activations finite yet so large that their outer products overflow fp32 (a norm weight of
    1e20, say): the model's content, named here, not a solver's traceback."""
    if H is not None and not all_finite(H):
        raise ContentError(f"{'/'.join(names)}: the Hessian of their inputs overflowed to NaN/Inf (activations "
                           "too large for fp32); check the model's weights before them")


def set_weight(layer: torch.nn.Module, name: str, weight: QuantizedWeight) -> None:
    """Put the dequantized `weight` into linear `name` of `layer` (keeping its dtype)."""
    module = layer.get_submodule(name)
    module.weight.data = weight.dequantize(module.weight.dtype)


def group_hessian(model: StreamingModel, layer: torch.nn.Module, hidden: torch.Tensor,
                  group: LinearGroup) -> tuple[torch.Tensor, int]:
    """H of one linear group from a pass over all windows: [K, K], or [kv, K, K] for
    attention-mixed inputs (value projections, see LinearGroup). Each pass stops as soon as
    the statistics are taken (never runs the rest of the layer)."""
    if group.mixed_by_attention:
        with model.eager_attention(), capture_attention_mixed(
            layer, group.linears[0], model.table.attention, model.config.num_key_value_heads
        ) as accumulator:
            model.feed_layer(layer, hidden, batch=model.eager_batch(hidden.shape[1]))
        return accumulator.hessian(), accumulator.tokens
    with capture_inputs(layer, (group.linears[0],), stop=True) as accumulators:
        model.feed_layer(layer, hidden)
    accumulator = accumulators[group.linears[0]]
    return accumulator.hessian(), accumulator.tokens


def layer_hessians(model: StreamingModel, layer: torch.nn.Module, hidden: torch.Tensor,
                   groups: tuple[LinearGroup, ...]) -> list[tuple[torch.Tensor, int]]:
    """(H, tokens) of each of `groups` (in the layer's execution order) as `group_hessian` gives
    them, bit for bit, from the layer as it is, in fewer passes: one pass for all groups but
    the attention-mixed ones (hooked together, stopping at the last group's input), and one
    eager pass per attention-mixed group. Where the groups are solved from the float layer
    (not true-sequential), this replaces a pass per group, each running the layer again up to
    its group's input."""
    plain = tuple(group.linears[0] for group in groups if not group.mixed_by_attention)
    found = {}
    if plain:
        with capture_inputs(layer, plain, stop=True) as accumulators:
            model.feed_layer(layer, hidden)
        for name in plain:  # each fp64 sum released once its fp32 H is made
            acc = accumulators.pop(name)
            found[name] = (acc.hessian(), acc.tokens)
        del acc
        short = [name for name in plain if found[name][1] != found[plain[-1]][1]]
        if short:  # a group listed after the one the pass stopped at: the table's order is not the layer's
            raise RuntimeError(f"{', '.join(short)}: input not seen on every window before {plain[-1]}'s; "
                               "the groups are not in the layer's execution order")
    return [group_hessian(model, layer, hidden, group) if group.mixed_by_attention else found[group.linears[0]]
            for group in groups]


def result_stats(result: GPTQResult) -> dict[str, float]:
    """Loss, relative loss and damping of a (possibly batched) GPTQ result, summed over the batch."""
    total = (result.loss / result.rel_loss.clamp_min(1e-30)).sum()
    return {"loss": float(result.loss.sum()), "rel_loss": float(result.loss.sum() / total.clamp_min(1e-30)),
            "damp": float(result.damp.max())}


KEEP_FLOAT = "_maverick_keep_float"  # attribute marking a linear that a keep_float override leaves unquantized
GRID = "_maverick_grid"  # attribute holding the QuantSpec a bits override gives a linear


def mark_linears(layer: torch.nn.Module, prefix: str, names: tuple[str, ...], spec: QuantizeSpec) -> tuple[str, ...]:
    """Mark the linears `names` of `layer` (relative to `prefix`) with their per-module
    overrides, so every solver honours them: those `spec.keep_float` keeps in float are skipped,
    those a bits override matches are solved on its grid. Returns the names kept in float."""
    kept = tuple(name for name in names if spec.keeps_float(prefix + name))
    for name in names:
        module, grid = layer.get_submodule(name), spec.weights_for(prefix + name)
        if name in kept:
            setattr(module, KEEP_FLOAT, True)
        elif grid is not spec.weights:
            setattr(module, GRID, grid)
    return kept


def quantized_linears(layer: torch.nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    """`names` without the linears kept in float by `mark_linears`."""
    return tuple(name for name in names if not getattr(layer.get_submodule(name), KEEP_FLOAT, False))


def shipped_grid(layer: torch.nn.Module, name: str, spec: QuantizeSpec) -> QuantSpec | None:
    """The grid the linear `name` is shipped on (`linear_grid`), or None when it is kept in float:
    AWQ's losses count no rounding error for it, as it is never rounded."""
    return None if getattr(layer.get_submodule(name), KEEP_FLOAT, False) else linear_grid(layer, name, spec)


def linear_grid(layer: torch.nn.Module, name: str, spec: QuantizeSpec) -> QuantSpec:
    """The grid the linear `name` of `layer` is quantized on: its bits override's (marked by
    `mark_linears`), else `spec.weights`."""
    return getattr(layer.get_submodule(name), GRID, spec.weights)


def solve_group(layer: torch.nn.Module, group: LinearGroup, H: torch.Tensor | None, tokens: int,
                spec: QuantizeSpec) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    """GPTQ each linear of `group` (but those kept in float) against H and put the dequantized
    weight back in `layer`.

    A per-KV-head H [kv, K, K] solves W [kv*hd, K] as a batch W.view(kv, hd, K); H None is
    H = I, solved in closed form (`identity_solve`: round to nearest)."""
    quantized, stats = {}, {}
    require_finite_hessian(H, group.linears)
    for name in quantized_linears(layer, group.linears):
        weight, grid = layer.get_submodule(name).weight.data.float(), linear_grid(layer, name, spec)
        per_head = H is not None and H.dim() == 3
        result = (identity_solve(weight, grid) if H is None else
                  gptq_quantize(weight.unflatten(0, (H.shape[0], -1)) if per_head else weight, H, grid))
        quantized[name] = result.weight.merge_leading() if per_head else result.weight
        set_weight(layer, name, quantized[name])
        stats[name] = {**result_stats(result), "tokens": tokens}
    return quantized, stats
