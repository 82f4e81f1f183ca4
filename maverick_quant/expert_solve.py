"""Solve one chunk of routed experts: each expert's inputs under its policy, the Hessians
stacked into one batch, GPTQ over the batch, and the per-expert audit records.

For experts [first, first + E_c) of one MoE block, with the block's input x [T, D] and its
routing (top-k, sigmoid score on the input, as Llama 4):

1. Each expert's policy (MoESpec: `routed`, `mixed`, `rtn`, from its token count) picks its
   inputs: routed rows x[t] * score[t], and for `mixed` an all-token sample weighted by the
   score the expert would have had.
2. gate/up are solved as one batch W [E_c, N, K] against the stacked Hessians [E_s, K, K]
   of the experts solved (E_s <= E_c; `rtn` experts, H = I, are rounded in closed form).
3. down is solved on act(gate) * up of the QUANTIZED gate/up, the same way.

experts.py streams the chunks through a whole MoE layer.
"""

from __future__ import annotations

import torch

from maverick_quant.arch.base import MoEBlock
from maverick_quant.calibration.moe import (Routing, activation, all_token_sample_size, expert_hidden, policy_hessian,
                                            resolve_policy, sample_tokens, widest_expert_input)
from maverick_quant.compress.gptq import gptq_quantize_each
from maverick_quant.compress.grid import rtn_quantize
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.groups import require_finite_hessian
from maverick_quant.recipe import ExpertPolicy, QuantizeSpec


def _expert_inputs(x: torch.Tensor, routing: Routing, expert: int, sample: torch.Tensor,
                   policy: ExpertPolicy) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(routed inputs x*score [n, D], sampled inputs x*sigmoid(logit_e) [T_s, D] if mixed);
    (None, None) for an `rtn` expert, whose H = I needs no inputs."""
    if policy is ExpertPolicy.RTN:
        return None, None
    tokens, scores = routing.tokens_of(expert)
    routed = x[tokens] * scores[:, None]
    if policy is not ExpertPolicy.MIXED:
        return routed, None
    would_be = torch.sigmoid(routing.logits[sample, expert].float()).to(x.dtype)
    return routed, x[sample] * would_be[:, None]


def _stack_hessians(hessians: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, list[int]]:
    """Per-expert H [K, K] or None (H = I) -> (the Hessians stacked [E_s, K, K], or None when
    every expert is rounded, and the experts E_s they belong to)."""
    solved = [e for e, H in enumerate(hessians) if H is not None]
    return (torch.stack([hessians[e] for e in solved]) if solved else None), solved


def _solve_batch(weights: dict[str, torch.Tensor], names: tuple[str, ...], H: torch.Tensor | None, solved: list[int],
                 spec: QuantizeSpec) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    """GPTQ W [E_c, N, K] of each named expert linear: the experts `solved` against their
    Hessians H [E_s, K, K] as one batch, the others (H = I: `rtn`) rounded to nearest in closed
    form (see `_stack_hessians`); per-expert losses [E_c] are returned for the audit."""
    quantized, stats = {}, {}
    require_finite_hessian(H, tuple(f"routed experts' {name}" for name in names))
    for name in names:
        result = gptq_quantize_each(weights[name], H, solved, spec.weights)
        quantized[name] = result.weight
        stats[name] = {"loss": result.loss.tolist(), "rel_loss": result.rel_loss.tolist(), "damp": result.damp.tolist()}
    return quantized, stats


def quantize_expert_chunk(x: torch.Tensor, routing: Routing, moe: MoEBlock, weights: dict[str, torch.Tensor],
                          first: int, spec: QuantizeSpec) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """GPTQ experts [first, first + E_c) given their unfused float weights {name: [E_c, N, K]}.

    Returns the quantized weights and one audit record per expert. The Hessians of the down
    projections are built from the already quantized gate/up (sequential within the expert).
    """
    count = weights[moe.experts_mid[0].name].shape[0]
    widest = widest_expert_input(weights[moe.experts_mid[0].name])
    sample = sample_tokens(x.shape[0], all_token_sample_size(spec.moe, widest), x.device)
    decisions = [resolve_policy(int(routing.counts[first + e]), spec.moe, widest) for e in range(count)]
    act = activation(moe.activation)
    in_names, mid_names = tuple(l.name for l in moe.experts_in), tuple(l.name for l in moe.experts_mid)
    gate, up = in_names  # Llama 4: the input group is (gate_proj, up_proj)

    inputs = [_expert_inputs(x, routing, first + e, sample, policy) for e, (policy, _) in enumerate(decisions)]
    H_in, solved = _stack_hessians([policy_hessian(policy, routed, every, spec.moe, x.shape[1], x.device)
                                    for (policy, _), (routed, every) in zip(decisions, inputs)])
    quantized, stats = _solve_batch(weights, in_names, H_in, solved, spec)
    del H_in
    # the down projections' inputs come from the quantized gate/up, for the experts solved only
    dequant = {name: quantized[name].dequantize() for name in in_names} if solved else {}

    def down_input(e: int, rows: torch.Tensor | None) -> torch.Tensor | None:
        if rows is None or decisions[e][0] is ExpertPolicy.RTN:  # H = I needs no activations
            return None
        return expert_hidden(rows, dequant[gate][e], dequant[up][e], act)

    width = weights[gate].shape[1]  # I: gate [E_c, I, D]
    H_mid, solved = _stack_hessians([policy_hessian(decisions[e][0], down_input(e, routed), down_input(e, every),
                                                    spec.moe, width, x.device) for e, (routed, every) in enumerate(inputs)])
    del inputs, dequant
    mid_quantized, mid_stats = _solve_batch(weights, mid_names, H_mid, solved, spec)
    quantized.update(mid_quantized)
    stats.update(mid_stats)
    widths = {**{name: x.shape[1] for name in in_names}, **{name: width for name in mid_names}}
    return quantized, _audit_records(routing, first, decisions, stats, widths, sample)


def _distinct_rows(routed: torch.Tensor, sample: torch.Tensor) -> int:
    """How many distinct tokens a `mixed` Hessian reads: its routed tokens [n] and the all-token
    sample [T_s] (token indices) overlap, and a token read twice adds no rank."""
    return int(torch.unique(torch.cat([routed, sample])).numel())


def _audit_records(routing: Routing, first: int, decisions: list, stats: dict[str, dict],
                   widths: dict[str, int], sample: torch.Tensor) -> list[dict]:
    """One record per expert of the chunk: tokens, share, policy and why, damping, per-linear
    losses, and `rank_deficient`: the linears solved on a Hessian from fewer distinct tokens
    than their input width K (rank < K: GPTQ fixes the null space by damping alone;
    docs/moe.md): a `routed` expert's routed tokens, a `mixed` one's routed tokens and the
    all-token `sample` [T_s] (token indices) together, each token counted once."""
    total = max(int(routing.counts.sum()), 1)
    records = []
    for e, (policy, reason) in enumerate(decisions):
        tokens = int(routing.counts[first + e])
        linears = {name: {key: values[e] for key, values in s.items()} for name, s in stats.items()}
        rows = _distinct_rows(routing.tokens_of(first + e)[0], sample) if policy is ExpertPolicy.MIXED else tokens
        deficient = [name for name, k in widths.items() if rows < k] if policy is not ExpertPolicy.RTN else []
        records.append({"expert": first + e, "tokens": tokens, "share": tokens / total, "policy": policy.value,
                        "reason": reason, "damp": max(l["damp"] for l in linears.values()), "linears": linears,
                        "rank_deficient": deficient})
    return records


def rtn_expert_chunk(moe: MoEBlock, weights: dict[str, torch.Tensor], first: int,
                     spec: QuantizeSpec) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """Round-to-nearest for experts [first, first + E_c) (no calibration: tokens unknown)."""
    quantized = {l.name: rtn_quantize(weights[l.name], spec.weights) for l in moe.expert_linears}
    count = weights[moe.experts_mid[0].name].shape[0]
    return quantized, [{"expert": first + e, "tokens": None, "share": None, "policy": "rtn", "reason": "method rtn"}
                       for e in range(count)]
