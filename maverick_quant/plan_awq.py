"""What AWQ's searches add to a quantize run (`plan` with --method awq or awq+gptq).

Notation: T calibration tokens, T_s = min(awq.sample_tokens, T) sampled tokens (MoE searches;
the dense groups' strided sample keeps `compress.awq.sampled_rows`, up to 2 T_s - 1), g = awq.grid
scale candidates, c = max(1, floor(awq.max_shrink x awq.clip_grid)) clip candidates (0 without
`awq.clip`), hidden D; an MoE layer has E routed experts of width I (top-k, n_e routed tokens
for expert e) and a shared expert of width I_s. "Rounded" counts weights put through
round-to-nearest (`rtn_fake`, fused), priced at the device's measured seconds per weight; "flops"
are matmuls, priced at its fp32 matmul rate (compress/awq.py, awq_layer.py, awq_moe.py):

    dense scale group of linears W_i [N_i, K] (Wg = sum N_i K weights):
        rounded g Wg, flops g 2 T_s Wg (each candidate's outputs on the sample),
        plus a pass of the layer over all T tokens to sample the group's input, which stops at
        the group: 2 T P_before (the weights of the linears computed before the group's,
        LayerPlan.params_before) and, past the attention, the attention (plan_passes.pass_flops)
    clipping (per linear W [N, K] with groups of width w, on rows = T_s sampled inputs): rounded
        c N K, flops c 2 min(rows, w) N K (each candidate's error projected on the groups'
        second moments when rows > w, built once for 2 rows K w, else on the rows themselves;
        `clip_flops`), and one more pass of the layer, stopped at the last group's input
    MoE block scale (one s [D] for the router, shared and routed experts): every candidate
        rounds the shared and every routed expert's gate/up, rounded g 2 D (I_s + E I), and
        runs the block on the sample, flops g 2 T_s (3 D I_s + k 3 D I); the routed experts
        are read once more for it (`expert_rereads`)
    up -> down scales: shared rounded g D I_s, flops g 2 T_s D I_s; expert e rounded g D I,
        flops g 2 min(T_s, n_e) D I
    clipping of the shared and routed experts: rounded c 3 D I, flops `clip_flops` of gate, up
        and down per expert (rows = T_s for the shared expert, min(T_s, n_e) for expert e)

Routed experts follow their policy (`resolve_policy` on the expected n_e): an expert under
`rtn` is neither scaled nor clipped; under `mixed` it reads T_s sampled tokens beside its own.

Memory (the `awq_search` term): CANDIDATES_AT_ONCE candidates of the widest weight searched,
three fp32 copies each (scaled, rounded, unscaled), and, in an MoE layer, the block search's
outputs on the sample for every candidate and the reference, twice over while a chunk's
outputs are added in, 2 (g + 1) T_s D fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from maverick_quant.compress.awq import CANDIDATES_AT_ONCE, candidate_ratios, sampled_rows
from maverick_quant.recipe import AWQSpec, QuantizeSpec

FP32 = 4


@dataclass(frozen=True)
class AWQCost:
    """What AWQ's searches add to one layer's cost (`awq_layer_cost`; the model is the module docstring)."""

    rounded: float  # weights put through round-to-nearest by the searches
    flops: float
    memory: int  # the awq_search term, bytes
    expert_rereads: int  # routed-expert weights read once more (the block scale search)


def clip_candidates(awq: AWQSpec) -> int:
    """Clip ranges tried per (row, group): c in the module docstring (0 without clipping)."""
    return max(1, int(awq.max_shrink * awq.clip_grid)) if awq.clip else 0


def awq_layer_cost(plan, dense: dict[str, tuple[int, int]], config, calib, spec: QuantizeSpec,
                   counts: list[float] | None) -> AWQCost:
    """AWQ's searches in one layer: `plan` the layer's LayerPlan, `dense` its quantized dense
    linears {name: (N, K)}, `config` the text config, `calib` the CalibSpec, `counts` [E] the
    expected routed tokens per expert (None for a dense layer)."""
    from maverick_quant.plan_passes import pass_flops

    awq = spec.awq
    tokens, hidden, inter = calib.samples * calib.seq_len, config.hidden_size, config.intermediate_size
    sampled, grid, clips = min(awq.sample_tokens, tokens), len(candidate_ratios(awq)), clip_candidates(awq)
    strided = sampled_rows(tokens, awq.sample_tokens)  # the dense searches' strided sample (the MoE ones take T_s)
    rounded = flops = 0.0
    widest = max((math.prod(shape) for shape in dense.values()), default=0)
    width = spec.weights.group_width
    for group in plan.scale_groups:
        shapes = [dense[name] for name in group.linears if name in dense]
        clipped = [dense[name] for name in group.linears if name in dense and name not in group.unclipped]
        weights = sum(math.prod(shape) for shape in shapes)
        rounded += grid * weights + clips * sum(math.prod(shape) for shape in clipped)
        flops += pass_flops(config, plan, calib, group.linears[0]) + grid * 2 * strided * weights
        flops += sum(clip_flops(strided, n, k, width(k), clips) for n, k in clipped)
    if clips and plan.scale_groups:  # the clip pass samples every group's input: it stops at the last group
        flops += pass_flops(config, plan, calib, plan.scale_groups[-1].linears[0])
    memory = 3 * CANDIDATES_AT_ONCE * widest * FP32
    rereads = 0
    if plan.moe is not None:
        moe_rounded, moe_flops = _moe_search(plan, dense, hidden, inter, sampled, grid, clips, width,
                                             _expert_rows(counts, spec, sampled, max(hidden, inter)))
        rounded, flops = rounded + moe_rounded, flops + moe_flops
        memory = max(memory, 3 * CANDIDATES_AT_ONCE * hidden * inter * FP32) + 2 * (grid + 1) * sampled * hidden * FP32
        rereads = plan.moe.num_experts * 3 * hidden * inter
    return AWQCost(rounded, flops, int(memory), rereads)


def _expert_rows(counts: list[float], spec: QuantizeSpec, sampled: int, width: int) -> list[float | None]:
    """Rows each routed expert's up -> down search and clipping read (None: an `rtn` expert,
    neither scaled nor clipped), from its expected routed tokens `counts` [E] and its policy."""
    from maverick_quant.calibration.moe import expected_policies
    from maverick_quant.recipe import ExpertPolicy

    policies = expected_policies(counts, spec.moe, width)
    return [None if policy is ExpertPolicy.RTN else min(sampled, count) + (sampled if policy is ExpertPolicy.MIXED else 0)
            for policy, count in zip(policies, counts)]


def clip_flops(rows: float, n: int, k: int, width: int, clips: int) -> float:
    """Flops of clipping one W [n, k] with groups of `width` on `rows` sampled inputs
    (compress/awq.clip_weights), beyond its rounding: each of the `clips` candidates projects its
    error on min(rows, width) values per weight, 2 n k min(rows, width); when rows > width the
    groups' second moments X_g^T X_g are built first, 2 rows k width."""
    if not clips:
        return 0.0
    return clips * 2 * min(rows, width) * n * k + (2 * rows * k * width if rows > width else 0.0)


def _mlp_clip_flops(rows: float, hidden: int, inter: int, width, clips: int) -> float:
    """`clip_flops` of a gated MLP's gate and up [inter, hidden] and down [hidden, inter]."""
    return 2 * clip_flops(rows, inter, hidden, width(hidden), clips) + clip_flops(rows, hidden, inter, width(inter), clips)


def _moe_search(plan, dense: dict[str, tuple[int, int]], hidden: int, inter: int, sampled: int, grid: int,
                clips: int, width, expert_rows: list[float | None]) -> tuple[float, float]:
    """(rounded weights, flops) of an MoE block's searches: the block scale, the up -> down
    scales and the clipping of the shared and routed experts (`expert_rows`: `_expert_rows`;
    `width`: the group width of a weight with K inputs)."""
    moe = plan.moe
    shared = sum(math.prod(dense[name]) for group in moe.shared for name in group.linears if name in dense) / 3
    rows = [row for row in expert_rows if row is not None]
    experts = len(rows)
    rounded = grid * 2 * (shared + len(expert_rows) * hidden * inter)  # the block scale: every gate/up, every candidate
    flops = grid * 2 * sampled * (3 * shared + moe.top_k * 3 * hidden * inter)
    rounded += grid * (shared + experts * hidden * inter)  # up -> down
    flops += grid * 2 * (sampled * shared + sum(rows) * hidden * inter)
    rounded += clips * 3 * (shared + experts * hidden * inter)
    flops += _mlp_clip_flops(sampled, hidden, round(shared / hidden), width, clips)
    flops += sum(_mlp_clip_flops(row, hidden, inter, width, clips) for row in rows)
    return rounded, flops
