"""Per-expert error and routing agreement of an MoE candidate, measured while validating.

Per-expert error. For routed expert e of an MoE layer, on the tokens t the REFERENCE routes
to it (with its sigmoid scores s_t, applied to the input as Llama 4 does):

    err_e = sum_t ||E_c(s_t x~_t) - E_r(s_t x_t)||^2 / sum_t ||E_r(s_t x_t)||^2

x_t = norm_r(h_t) and x~_t = norm_c(h_t) are the two models' block inputs computed from the
same reference residual h_t entering the block. They are equal unless AWQ folded a scale into
the candidate's norm, whose experts then expect that scaled input. So err_e is the damage done
by quantizing expert e alone, on the inputs it sees in use (the quantize-time audit only has
the calibration tokens' loss).

Routing agreement between two routings of the same tokens: the share of one's (token, slot)
choices that the other also makes (for top-1, the share of tokens sent to the same expert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maverick_quant.calibration.moe import Routing, expert_hidden
from maverick_quant.validation.metrics import quantiles

MIN_TOKENS_FOR_MAX = 16
"""The worst expert (`rel_error.max`, a gate key) is taken over experts with at least this many
evaluation tokens: an expert that saw one token has an error but not a measurement."""


@dataclass(frozen=True)
class ExpertError:
    """Squared-error sums of one routed expert over its `tokens` evaluation tokens."""

    layer: int
    expert: int
    tokens: int
    error: float
    signal: float

    @property
    def rel_error(self) -> float | None:
        """err_e, or None for an expert the reference routed no token to."""
        return self.error / max(self.signal, 1e-30) if self.tokens else None


def expert_output(x_in: torch.Tensor, experts: dict[str, torch.Tensor], offset: int, act) -> torch.Tensor:
    """down(act(gate x) * up x) of expert `offset` of a chunk {"gate_proj", "up_proj", "down_proj"}
    on its (score-weighted) inputs x_in [n, D] -> [n, D]."""
    hidden = expert_hidden(x_in, experts["gate_proj"][offset], experts["up_proj"][offset], act)
    return torch.nn.functional.linear(hidden, experts["down_proj"][offset])


@torch.no_grad()
def compare_expert_chunk(layer: int, x_ref: torch.Tensor, x_cand: torch.Tensor, routing: Routing,
                         reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], act,
                         first: int, out: torch.Tensor) -> list[ExpertError]:
    """Experts [first, first + E_c) of both models ({name: [E_c, N, K]}) on the reference's
    routing of x_ref / x_cand [T, D]: the reference outputs are added to `out` [T, D] (the
    reference block's forward, as `routed_forward`), and each expert's error sums are returned."""
    results = []
    for offset in range(reference["down_proj"].shape[0]):
        tokens, scores = routing.tokens_of(first + offset)
        if tokens.numel() == 0:
            results.append(ExpertError(layer, first + offset, 0, 0.0, 0.0))
            continue
        y_ref = expert_output(x_ref[tokens] * scores[:, None], reference, offset, act)
        y_cand = expert_output(x_cand[tokens] * scores[:, None], candidate, offset, act)
        results.append(ExpertError(layer, first + offset, tokens.numel(), squared_norm(y_cand - y_ref),
                                   squared_norm(y_ref)))
        out.index_add_(0, tokens, y_ref)
    return results


def squared_norm(values: torch.Tensor) -> float:
    """sum of values^2, accumulated in fp64 (no fp64 copy of `values`)."""
    return torch.linalg.vector_norm(values, dtype=torch.float64).item() ** 2


@torch.no_grad()
def candidate_block_input(norm: torch.nn.Module, reference_norm: torch.nn.Module, residual: torch.Tensor,
                          x_ref: torch.Tensor, rows_at_once: int = 8192) -> torch.Tensor:
    """The candidate's MoE block input x~ [T, D] = norm_c(h), `norm` the candidate layer's
    norm before the block, from the reference's residual h [S, L, D] (host): `x_ref` itself
    when the two norms' weights are equal, else computed `rows_at_once` tokens at a time on
    x_ref's device."""
    if torch.equal(norm.weight, reference_norm.weight):
        return x_ref
    rows = residual.reshape(-1, residual.shape[-1])
    x_cand = torch.empty_like(x_ref)
    for start in range(0, rows.shape[0], rows_at_once):
        x_cand[start : start + rows_at_once] = norm(rows[start : start + rows_at_once].to(x_ref.device, x_ref.dtype))
    return x_cand


def routing_agreement(reference: Routing, candidate: Routing) -> float:
    """Share of the reference's (token, slot) choices [T, k] that the candidate also makes."""
    shared = (reference.choice[:, :, None] == candidate.choice[:, None, :]).any(-1)
    return shared.double().mean().item()


def _worst(values: list[tuple[float, int]]) -> dict:
    """{"min", "min_layer"} of (value, layer) pairs."""
    value, layer = min(values)
    return {"min": value, "min_layer": layer}


def summarize_experts(errors: list[ExpertError], min_tokens: int = MIN_TOKENS_FOR_MAX) -> dict:
    """The report's "experts" entry: count, measured (experts with evaluation tokens),
    rel_error {pooled: sum of errors / sum of signals over all experts, median over measured
    experts, max over experts with >= `min_tokens` tokens or a non-finite error (a broken expert
    fails a max gate whatever its token count), and where}, and one row per expert."""
    measured = [e for e in errors if e.tokens]
    rows = [{"layer": e.layer, "expert": e.expert, "eval_tokens": e.tokens, "rel_error": e.rel_error} for e in errors]
    summary = {"count": len(errors), "measured": len(measured), "per_expert": rows}
    if not measured:
        return summary
    rel_error = {"pooled": sum(e.error for e in measured) / max(sum(e.signal for e in measured), 1e-30),
                 "median": quantiles(torch.tensor([e.rel_error for e in measured], dtype=torch.float64), (0.5,))[0],
                 "max_min_tokens": min_tokens}  # NaN when an expert's error is (statistics.median would not say)
    counted = [e for e in measured if e.tokens >= min_tokens or not math.isfinite(e.rel_error)]  # NaN: always the max
    if counted:
        worst = max(counted, key=lambda e: e.rel_error if math.isfinite(e.rel_error) else math.inf)
        rel_error.update({"max": worst.rel_error, "max_layer": worst.layer, "max_expert": worst.expert})
    return {**summary, "rel_error": rel_error}


def summarize_routing(layers: list[dict]) -> dict:
    """The report's "routing" entry from the per-layer records: the mean and the worst layer of
    `routing_agreement` (each model on its own stream) and `routing_agreement_local` (the
    candidate layer on the reference's input), over the MoE layers where both were measured."""
    out = {}
    for key, name in (("routing_agreement", "agreement"), ("routing_agreement_local", "agreement_local")):
        values = [(layer[key], layer["layer"]) for layer in layers if layer.get(key) is not None]
        if values:
            out[name] = {"mean": sum(v for v, _ in values) / len(values), **_worst(values)}
    return out
