"""Routed mixture-of-experts math for calibration, faithful to `Llama4TextMoe`.

Shapes: x [T, D] routed input (the post-attention norm's output, flattened over windows),
router weight [E, D], expert weights unfused W_gate/W_up [E?, I, D], W_down [E?, D, I].

Llama 4: logits = x W_r^T; each token goes to its top-k experts; the expert sees
x * sigmoid(logit) (the score scales the INPUT), computes act(x' W_g^T) * (x' W_u^T) and
projects with W_d; the block adds the shared expert's output of x. Here an expert only ever
touches its routed tokens (transformers runs every expert on every token, zeros included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from maverick_quant.compress.routing import group_by_expert
from maverick_quant.recipe import ExpertPolicy, MoESpec


@dataclass(frozen=True)
class Routing:
    """Top-k routing of T tokens over E experts.

    logits [T, E] router logits; choice [T, k] chosen experts; scores [T, k] their sigmoid
    scores in x's dtype; order [T*k] the (token, slot) pairs sorted by expert (stable) and
    offsets [E+1] so that expert e owns order[offsets[e]:offsets[e+1]].
    """

    logits: torch.Tensor
    choice: torch.Tensor
    scores: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """Tokens routed to each expert, int64 [E]."""
        return self.offsets.diff()

    def tokens_of(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token indices [n], scores [n]) of the tokens routed to `expert`, in token order."""
        pairs = self.order[self.offsets[expert] : self.offsets[expert + 1]]
        k = self.choice.shape[1]
        return pairs // k, self.scores.reshape(-1)[pairs]


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> Routing:
    """Llama4Router: logits = x W^T, top-k per token, score = sigmoid(logit) (computed in fp32,
    cast back to x's dtype, as transformers does)."""
    logits = torch.nn.functional.linear(x, router_weight)
    top_value, choice = torch.topk(logits, top_k, dim=1)
    scores = torch.sigmoid(top_value.float()).to(x.dtype)
    order, offsets = group_by_expert(choice, router_weight.shape[0])
    return Routing(logits, choice, scores, order, offsets)



def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def expert_hidden(x_in: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: Callable) -> torch.Tensor:
    """act(x' W_g^T) * (x' W_u^T): [n, D] scaled inputs, W [I, D] -> [n, I] (down's input)."""
    return act(torch.nn.functional.linear(x_in, gate)) * torch.nn.functional.linear(x_in, up)


def routed_forward(x: torch.Tensor, routing: Routing, experts: dict[str, torch.Tensor], act: Callable,
                   first: int = 0, out: torch.Tensor | None = None,
                   observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Add the outputs of experts [first, first + E_c) to `out` [T, D] (zeros if None).

    experts: {"gate_proj": [E_c, I, D], "up_proj": [E_c, I, D], "down_proj": [E_c, D, I]}.
    Each expert runs on its routed tokens only, with the score applied to its input.
    `observe(expert, x_in [n, D], hidden [n, I])`, if given, sees each expert's gate/up input
    and down input (e.g. to collect an importance matrix).
    """
    out = torch.zeros_like(x) if out is None else out
    for offset in range(experts["down_proj"].shape[0]):
        tokens, scores = routing.tokens_of(first + offset)
        if tokens.numel() == 0:
            continue
        x_in = x[tokens] * scores[:, None]
        hidden = expert_hidden(x_in, experts["gate_proj"][offset], experts["up_proj"][offset], act)
        if observe is not None:
            observe(first + offset, x_in, hidden)
        out.index_add_(0, tokens, torch.nn.functional.linear(hidden, experts["down_proj"][offset]))
    return out


def widest_expert_input(down: torch.Tensor) -> int:
    """The widest input K over an expert's projections, from its down weight `down` [E, hidden, inter]:
    gate/up read `hidden` columns, down reads `inter` (what a full-rank routed Hessian needs in tokens)."""
    return max(down.shape[-2], down.shape[-1])


def resolve_policy(tokens: int, spec: MoESpec, width: int) -> tuple[ExpertPolicy, str]:
    """The policy applied to an expert with `tokens` routed tokens, and why (for the audit).
    `width`: the widest input K of the expert's projections (`widest_expert_input`, for
    `spec.require_full_rank`)."""
    if spec.policy is ExpertPolicy.RTN:
        return ExpertPolicy.RTN, "policy rtn"
    if tokens < spec.min_tokens:
        return spec.fallback, f"fallback: {tokens} routed tokens < min_tokens {spec.min_tokens}"
    if spec.require_full_rank and tokens < width:
        return spec.fallback, f"fallback: {tokens} routed tokens < input width {width} (require_full_rank)"
    return spec.policy, f"policy {spec.policy.value}"


def expected_policies(counts: list[float], spec: MoESpec, width: int) -> list[ExpertPolicy]:
    """The policy `resolve_policy` gives each expert for its expected routed tokens `counts` [E]
    (rounded to whole tokens), as a planner that has no routing yet foresees it."""
    return [resolve_policy(round(count), spec, width)[0] for count in counts]


RANK_DEFICIENT_ADVICE = ("a routed expert: --moe-require-full-rank or --moe-policy mixed; a mixed one: at least K "
                         "calibration tokens in all, within moe.all_tokens (docs/moe.md)")
AUTO_SAMPLE_FLOOR = 4096  # rows of H_all,e's sample at least, when `moe.all_tokens` is left to the default


def all_token_sample_size(spec: MoESpec, width: int) -> int:
    """T_s, the most rows in the all-token sample behind a `mixed` expert's H_all,e.

    `spec.all_tokens` when given, else max(4096, 2 K) for `width` K, the widest input of the
    expert's projections (`widest_expert_input`): a mean of n outer products has rank <= n, so a
    sample of fewer than K rows would leave H_all,e rank-deficient too, and `mixed` would fix
    the null space by damping alone, as `routed` does (Maverick: K = 8192 for down, T_s = 16,384).
    """
    return spec.all_tokens if spec.all_tokens is not None else max(AUTO_SAMPLE_FLOOR, 2 * width)


def sample_tokens(total: int, limit: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Evenly spaced, deterministic token indices [min(total, limit)] for H_all, on `device`
    (computed on the host: the same indices on every device)."""
    if total <= limit:
        return torch.arange(total, device=device)
    return torch.linspace(0, total - 1, limit).round().long().to(device)


def mean_outer(rows: torch.Tensor, width: int, chunk: int = 8192) -> torch.Tensor:
    """(1/n) rows^T rows [K, K] fp32: each `chunk` of rows multiplied in fp32 (fast), the
    partial sums accumulated in fp64 (stable over millions of tokens); zeros for n = 0. On
    the rows' device."""
    if rows.shape[0] == 0:
        return torch.zeros(width, width, device=rows.device)
    total = torch.zeros(width, width, dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk].float()
        total += part.T @ part
    return (total / rows.shape[0]).float()


def policy_hessian(policy: ExpertPolicy, routed_rows: torch.Tensor | None, all_rows: torch.Tensor | None,
                   spec: MoESpec, width: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """H [K, K] of one expert linear under its policy, on `device`.

    routed_rows [n, K]: what the linear reads on the expert's routed tokens; all_rows [T_s, K]:
    what it would read on the sampled tokens at the expert's own score (needed for `mixed`).
    routed: mean_outer(routed); mixed: that + spec.mix * mean_outer(all); rtn: None, meaning
    H = I (GPTQ against I is round to nearest; `gptq_quantize_each` rounds such experts in
    closed form beside the batch it solves).
    """
    if policy is ExpertPolicy.RTN:
        return None
    H = mean_outer(routed_rows, width)
    if policy is ExpertPolicy.MIXED:
        H = H + spec.mix * mean_outer(all_rows, width)
    return H
