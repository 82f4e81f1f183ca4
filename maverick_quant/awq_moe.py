"""AWQ for a routed MoE block (Llama 4): one input scale for the whole block, then per expert.

The post-attention norm feeds the router, the shared expert and every routed expert, so
one scale s [D] serves them all: the norm's weight is divided by s, and the router's, the
shared expert's and every expert's gate/up columns multiplied by s. The router stays in
float, so its logits, hence the routing, do not change (up to fp rounding). The search loss
is the whole block's output on a sample of its calibration tokens with faithful routing:
for every candidate s, gate/up of the shared expert and of every routed expert are
quantized (RTN) while down stays float, and ||block_s(x) - block(x)||^2 is accumulated
chunk of experts by chunk (experts are read once for the search, once more to quantize).

Then each routed expert gets its own up -> down scale, searched on its routed tokens
(x * score); an expert below `moe.min_tokens` follows the same fallback as GPTQ: `mixed`
searches on the sampled tokens at the score it would have given them, `rtn` keeps s = 1.
The shared expert's up -> down scale is searched on all sampled tokens.

With `awq.clip`, every expert's gate/up are then clipped on the rows its scale was searched
on, and its down on the hidden act(gate) * up of the clipped gate/up; the shared expert the
same way on the sampled block inputs. An expert under the `rtn` policy is neither scaled nor
clipped (it has no inputs to judge by).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maverick_quant.arch.base import MoEBlock
from maverick_quant.calibration.moe import (Routing, activation, expert_hidden, resolve_policy, sample_tokens,
                                            widest_expert_input)
from maverick_quant.compress.awq import (CANDIDATES_AT_ONCE, ScaleSearch, candidate_ratios, candidate_scales, clip_weights, duo_weight_mean,
                                         output_loss,
                                         rtn_fake, scale_columns, search_scales)
from maverick_quant.groups import shipped_grid
from maverick_quant.recipe import ExpertPolicy, QuantizeSpec, QuantSpec
from maverick_quant.awq_layer import as_stored, fold_into_stored_norm
from maverick_quant.streaming import StreamingModel


@dataclass(frozen=True)
class BlockSample:
    """The block's inputs on sampled tokens: x [T_s, D] and their routing (choice, scores [T_s, k])."""

    x: torch.Tensor
    choice: torch.Tensor
    scores: torch.Tensor


def block_sample(x: torch.Tensor, routing: Routing, tokens: int) -> BlockSample:
    rows = sample_tokens(x.shape[0], tokens, x.device)
    return BlockSample(x[rows], routing.choice[rows], routing.scores[rows])


def _shared_output(layer: torch.nn.Module, moe: MoEBlock, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    down = layer.get_submodule(moe.shared_module).down_proj.weight.float()
    return torch.nn.functional.linear(expert_hidden(x, gate, up, activation(moe.activation)), down)


def _routed_outputs(sample: BlockSample, weights: dict[str, torch.Tensor], first: int, act,
                    scales: torch.Tensor | None, spec: QuantizeSpec, chunk: int = CANDIDATES_AT_ONCE) -> torch.Tensor:
    """Outputs [G, T_s, D] (G = 1 when scales is None: float) of experts [first, first+E_c)
    on their sampled tokens, gate/up quantized under each candidate scale, `chunk` candidates
    at a time: each holds gate and up as [chunk, I, D] in fp32 (Maverick: 0.67 GB a weight at 4,
    where all 20 at once were 3.4 GB, with as much again in rounding temporaries)."""
    count = weights["down_proj"].shape[0]
    groups = 1 if scales is None else scales.shape[0]
    out = torch.zeros(groups, *sample.x.shape, device=sample.x.device)
    for offset in range(count):
        rows, slots = (sample.choice == first + offset).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        x_in = sample.x[rows] * sample.scores[rows, slots][:, None]
        gate, up, down = (weights[name][offset] for name in ("gate_proj", "up_proj", "down_proj"))
        for start in range(0, groups, chunk):
            if scales is None:
                g, u = gate, up
            else:  # [c, I, D] for candidates start..start+c
                g, u = (_scaled_rtn(w, scales[start : start + chunk], spec.weights) for w in (gate, up))
            hidden = act(x_in @ g.transpose(-1, -2)) * (x_in @ u.transpose(-1, -2))
            out[start : start + chunk, rows] += hidden @ down.T
    return out


def _scaled_rtn(W: torch.Tensor, scales: torch.Tensor, grid: QuantSpec | None) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1 for W [I, D] on `grid` under each candidate s [G, D] -> [G, I, D]
    (W itself for each when `grid` is None: a linear kept in float)."""
    if grid is None:
        return W[None].expand(scales.shape[0], -1, -1)
    return rtn_fake(W[None] * scales[:, None, :], grid) / scales[:, None, :]


def _shared_grids(layer: torch.nn.Module, moe: MoEBlock, spec: QuantizeSpec) -> tuple[QuantSpec | None, ...]:
    """The grids the shared expert's gate, up and down are shipped on (a bits override may
    change them; None: kept in float, `shipped_grid`)."""
    return tuple(shipped_grid(layer, f"{moe.shared_module}.{name}", spec) for name in ("gate_proj", "up_proj", "down_proj"))


def search_block_scale(model: StreamingModel, index: int, layer: torch.nn.Module, x: torch.Tensor,
                       routing: Routing, spec: QuantizeSpec) -> ScaleSearch:
    """The block input scale minimising the block's output error on sampled tokens (see module doc)."""
    moe = model.plan(index).moe
    sample = block_sample(x, routing, spec.awq.sample_tokens)
    act = activation(moe.activation)
    shared = layer.get_submodule(moe.shared_module)
    gate, up = shared.gate_proj.weight.float(), shared.up_proj.weight.float()
    duo = duo_weight_mean([gate, up], spec.weights) if spec.awq.duo_scaling else None  # the shared expert stands for all consumers
    candidates = candidate_scales(x.abs().mean(0), duo, spec.awq)
    reference = _shared_output(layer, moe, sample.x, gate, up)
    grids = _shared_grids(layer, moe, spec)
    quantized = torch.stack([_shared_output(layer, moe, sample.x, *(_scaled_rtn(w, s[None], g)[0]
                                                                    for w, g in zip((gate, up), grids)))
                             for s in candidates])
    from maverick_quant.experts import expert_chunks, read_experts

    for first, count in expert_chunks(moe, model.config, spec.moe.chunk_mib):
        weights = {k: v.float() for k, v in read_experts(model, index, first, count).items()}
        reference += _routed_outputs(sample, weights, first, act, None, spec)[0]
        quantized += _routed_outputs(sample, weights, first, act, candidates, spec)
    losses = (quantized - reference[None]).double().square().sum((1, 2)) / sample.x.shape[0]
    best = int(losses.argmin())
    return ScaleSearch(candidates[best], candidate_ratios(spec.awq)[best], losses)


def apply_block_scale(layer: torch.nn.Module, moe: MoEBlock, scales: torch.Tensor) -> torch.Tensor:
    """Fold s [D] into the block's input norm (`fold_into_stored_norm`) and scale the router's and
    the shared expert's gate/up columns by the scale it realised, s': the folded block computes
    the float block's function. Returns s' [D] fp32, which the routed experts' gate/up columns
    and the block input (x / s') take too."""
    realised = fold_into_stored_norm(layer, layer.get_submodule(moe.residual_input), scales)
    for name in (moe.router, *moe.shared[0].linears):
        module = layer.get_submodule(name)
        module.weight.data = scale_columns(module.weight.data, realised)
    router = layer.get_submodule(moe.router)  # a float router is shipped in the checkpoint's dtype
    router.weight.data = as_stored(layer, router.weight.data)
    return realised


def scale_shared_down(layer: torch.nn.Module, moe: MoEBlock, x: torch.Tensor, spec: QuantizeSpec) -> ScaleSearch:
    """up -> down scale of the shared expert, on sampled block inputs."""
    shared = layer.get_submodule(moe.shared_module)
    rows = x[sample_tokens(x.shape[0], spec.awq.sample_tokens, x.device)]
    hidden = expert_hidden(rows, shared.gate_proj.weight.float(), shared.up_proj.weight.float(), activation(moe.activation))
    down = shared.down_proj.weight.float()
    duo = duo_weight_mean([down], spec.weights) if spec.awq.duo_scaling else None
    result = search_scales(hidden.abs().mean(0), duo, output_loss(hidden, [down], _shared_grids(layer, moe, spec)[2]),
                           spec.awq)
    shared.up_proj.weight.data = shared.up_proj.weight.data / result.scales.to(shared.up_proj.weight.dtype)[:, None]
    shared.down_proj.weight.data = scale_columns(shared.down_proj.weight.data, result.scales)
    return result


def clip_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, rows: torch.Tensor, act,
                spec: QuantizeSpec, grids: tuple[QuantSpec, ...] | None = None,
                row_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """AWQ clipping of one gated MLP: gate, up [I, D] on its inputs rows [T, D], then down
    [D, I] on h = act(rows gate^T) * (rows up^T) computed with the clipped gate/up; each on its
    grid of `grids` (gate, up, down; default the run's). `row_weights` [T] (default 1) weigh
    each row's squared error by w^2: gate/up see w x, down sees w h (h from the unweighted
    row, as the nonlinearity is not homogeneous)."""
    grids = grids or (spec.weights,) * 3
    weighted = rows if row_weights is None else rows * row_weights[:, None]
    gate, up = (w if g is None else clip_weights(w, weighted, g, spec.awq) for w, g in zip((gate, up), grids))
    if grids[2] is None:
        return gate, up, down
    return gate, up, clip_weights(down, _weighted_hidden(rows, gate.float(), up.float(), act, row_weights), grids[2], spec.awq)


def _weighted_hidden(rows: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act,
                     row_weights: torch.Tensor | None) -> torch.Tensor:
    """w_t * act(x_t gate^T) * (x_t up^T) per row t: [T, I] (w = 1 without `row_weights`)."""
    hidden = expert_hidden(rows, gate, up, act)
    return hidden if row_weights is None else hidden * row_weights[:, None]


def clip_shared(layer: torch.nn.Module, moe: MoEBlock, x: torch.Tensor, spec: QuantizeSpec) -> None:
    """Clip the shared expert's linears (in place) on sampled block inputs x [T, D]."""
    shared = layer.get_submodule(moe.shared_module)
    linears = (shared.gate_proj, shared.up_proj, shared.down_proj)
    rows = x[sample_tokens(x.shape[0], spec.awq.sample_tokens, x.device)].float()
    clipped = clip_expert(*(linear.weight.data for linear in linears), rows, activation(moe.activation), spec,
                          _shared_grids(layer, moe, spec))
    for linear, weight in zip(linears, clipped):  # a linear kept in float keeps its range (grid None)
        linear.weight.data = weight


def _expert_rows(x: torch.Tensor, routing: Routing, expert: int, sample: torch.Tensor, policy: ExpertPolicy,
                 spec: QuantizeSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the expert reads for its scale search: (rows [T, D], row weights [T] or None).
    Rows are at most `sample_tokens` of its routed inputs x*score; under `mixed` also the
    sampled tokens at their would-be score x*sigmoid(logit_e), weighted w = sqrt(mix * n / T_s)
    so that squared errors weigh them as GPTQ's H_routed + mix * H_all does. The weight goes
    on each row's error (`clip_expert`, `_weighted_hidden`), not into the input: down's input
    act(x gate^T) * (x up^T) would shrink by about w^2, not w, from a scaled x."""
    tokens, scores = routing.tokens_of(expert)
    keep = sample_tokens(tokens.numel(), spec.awq.sample_tokens, tokens.device)
    rows = x[tokens[keep]] * scores[keep, None]
    if policy is not ExpertPolicy.MIXED:
        return rows, None
    would_be = torch.sigmoid(routing.logits[sample, expert].float()).to(x.dtype)
    weight = (spec.moe.mix * rows.shape[0] / sample.numel()) ** 0.5 if rows.shape[0] else 1.0
    weights = torch.cat([torch.ones(rows.shape[0]), torch.full((sample.numel(),), weight)]).to(x.device)
    return torch.cat([rows, x[sample] * would_be[:, None]]), weights


def scale_expert_chunk(x: torch.Tensor, routing: Routing, moe: MoEBlock, weights: dict[str, torch.Tensor], first: int,
                       block_scales: torch.Tensor, spec: QuantizeSpec) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Experts [first, first+E_c) with the block scale applied to gate/up and each expert's
    own up -> down scale searched and folded; returns the weights and a record per expert.
    `x` is the block input after the block scale was folded into the norm (x / s)."""
    act = activation(moe.activation)
    gate, up, down = (weights[name].float().clone() for name in ("gate_proj", "up_proj", "down_proj"))
    gate, up = scale_columns(gate, block_scales), scale_columns(up, block_scales)
    sample = sample_tokens(x.shape[0], spec.awq.sample_tokens, x.device)
    records = []
    for offset in range(down.shape[0]):
        expert = first + offset
        policy, reason = resolve_policy(int(routing.counts[expert]), spec.moe, widest_expert_input(down))
        record = {"expert": expert, "awq_policy": policy.value, "awq_reason": reason, "awq_ratio": None}  # not searched
        records.append(record)
        if policy is ExpertPolicy.RTN:
            continue
        rows, row_weights = _expert_rows(x, routing, expert, sample, policy, spec)
        rows = rows.float()
        hidden = _weighted_hidden(rows, gate[offset], up[offset], act, row_weights)
        duo = duo_weight_mean([down[offset]], spec.weights) if spec.awq.duo_scaling else None
        result = search_scales(hidden.abs().mean(0), duo, output_loss(hidden, [down[offset]], spec.weights), spec.awq)
        up[offset] = up[offset] / result.scales[:, None]
        down[offset] = scale_columns(down[offset], result.scales)
        record["awq_ratio"] = result.ratio
        if spec.awq.clip:
            gate[offset], up[offset], down[offset] = clip_expert(gate[offset], up[offset], down[offset], rows, act, spec,
                                                                 row_weights=row_weights)
    return {"gate_proj": gate, "up_proj": up, "down_proj": down}, records
