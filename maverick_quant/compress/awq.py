"""AWQ: activation-aware per-channel scales and clipping, as pure tensor functions.

For linears y = x W^T that read the same input x [T, K], a positive scale s [K] per input
channel leaves the float function unchanged when x is divided by s upstream (folded into
the previous norm or linear) and W's columns are multiplied by s:  (x / s)(W diag(s))^T.
Quantization error then lands on W diag(s): channels with large |x| get larger weights,
hence relatively finer steps. The search tries s = mean|x|^alpha (or, with duo scaling,
mean|x|^alpha / mean|w|^(1-alpha)) for alpha = 0, 1/grid, ..., normalised so that
sqrt(max(s) min(s)) = 1, and keeps the alpha whose quantized output is closest to the float
one under a loss the CALLER supplies (the linears' outputs, a whole MoE block...). The first
candidate is always s = 1, i.e. plain RTN (alpha = 0 without duo scaling; an extra candidate
with it, where alpha = 0 is 1 / mean|w|), so the chosen scales never do worse than RTN on
that loss, and its loss is the RTN loss the audit reports.

Clipping then shrinks each (row, group) range to max|w| (1 - i/clip_grid) where that
lowers the output error ||X_g (Q(w_g) - w_g)||^2 on sampled inputs.

Nothing here touches modules, hooks or disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from maverick_quant.compress.grid import group_params, quantize_grouped, rtn_quantize
from maverick_quant.compress.kquant import SUPER_BLOCK, offset_grid_params, uses_k_grid
from maverick_quant.recipe import AWQSpec, QuantSpec


@dataclass(frozen=True)
class ScaleSearch:
    """scales [K] chosen; ratio the alpha that gave them (None: s = 1 won a duo search);
    losses [C] of every candidate (`candidate_ratios`), the first s = 1."""

    scales: torch.Tensor
    ratio: float | None
    losses: torch.Tensor

    @property
    def rtn_loss(self) -> float:
        """The loss of s = 1, plain round-to-nearest (the first candidate)."""
        return float(self.losses[0])


def split_groups(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """t [..., K] as fp32 [..., G, width] in the quantization groups of `spec` (the last group
    zero-padded to the width)."""
    k = t.shape[-1]
    width, groups = spec.group_width(k), spec.groups_for(k)
    return torch.nn.functional.pad(t.float(), (0, groups * width - k)).view(*t.shape[:-1], groups, width)


def duo_weight_mean(weights: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Duo scaling's mean|w| [K] of linears sharing an input: each weight of their stacked rows
    [N, K] over the largest magnitude of its own quantization group (of `spec`: AWQ's reference
    normalises per group, not per row), then the mean over the rows."""
    stacked = torch.cat(weights)
    grouped = split_groups(stacked, spec).abs()
    normalised = grouped / (grouped.amax(-1, keepdim=True) + 1e-6)
    return normalised.flatten(-2)[:, : stacked.shape[-1]].mean(0)


def sample_stride(tokens: int, sample_tokens: int) -> int:
    """Every how many of `tokens` calibration tokens the searches sample one: max(1, T // T_s).
    It keeps ceil(T / stride) rows, between T_s and 2 T_s - 1 (all T when T < 2 T_s)."""
    return max(1, tokens // sample_tokens)


def sampled_rows(tokens: int, sample_tokens: int) -> int:
    """How many rows `sample_stride` keeps of `tokens`."""
    return -(-tokens // sample_stride(tokens, sample_tokens))


def candidate_ratios(awq: AWQSpec) -> list[float | None]:
    """The alpha of each candidate of `candidate_scales`: i / grid, after a None for s = 1 with duo scaling."""
    return ([None] if awq.duo_scaling else []) + [i / awq.grid for i in range(awq.grid)]


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, awq: AWQSpec) -> torch.Tensor:
    """Scales [C, K] for alpha = i / grid from mean|x| [K] (and mean|w| [K] for duo scaling,
    after s = 1 as the first candidate: `candidate_ratios`)."""
    ratios = torch.arange(awq.grid, dtype=torch.float64, device=x_mean.device)[:, None] / awq.grid
    x = x_mean.double().clamp_min(1e-4)[None]
    if awq.duo_scaling:
        scales = x**ratios / w_mean.double().clamp_min(1e-4)[None] ** (1 - ratios)
    else:
        scales = x**ratios
    scales = scales.clamp_min(1e-4)
    scales = (scales / (scales.amax(1, keepdim=True) * scales.amin(1, keepdim=True)).sqrt()).float()
    return torch.cat([torch.ones_like(scales[:1]), scales]) if awq.duo_scaling else scales


CANDIDATES_AT_ONCE = 4  # scale candidates quantized together: a weight [N, K] is held as [4, N, K] fp32


def rtn_fake(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest of W [..., N, K] on the group grid of `spec`, dequantized (fp32):
    rtn_quantize(W, spec).dequantize() bit for bit, computed on the grouped view [..., N, G, width]
    in one temporary (w / s, round, + z, clamp, - z, * s in place) instead of codes, per-column
    scales and zeros and their dequantization (AWQ's searches round each weight tens of times:
    4x faster on the CPU). llama.cpp's offset grids go through rtn_quantize."""
    k = W.shape[-1]
    if offset_grid_params(spec, k) is not None:
        return rtn_quantize(W, spec).dequantize()
    scales, zeros = group_params(W, spec)
    snapped = quantize_grouped(W, scales, zeros, spec).sub_(zeros[..., None]).mul_(scales[..., None])
    return snapped.flatten(-2)[..., :k]


def scaled_quantized(W: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1 for each candidate: W [N, K], scales [G, K] -> [G, N, K], the
    weight the quantized model effectively applies to the unscaled input x."""
    scaled = W.float()[None] * scales[:, None, :]
    return rtn_fake(scaled, spec) / scales[:, None, :]


def search_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None,
                  loss: Callable[[torch.Tensor], torch.Tensor], awq: AWQSpec) -> ScaleSearch:
    """The candidate scales [K] minimising `loss(scales [G, K]) -> [G]` (all candidates are
    handed to `loss` at once, so it can evaluate them as one batch)."""
    candidates = candidate_scales(x_mean, w_mean, awq)
    losses = loss(candidates).double()
    best = int(torch.argmin(losses))
    return ScaleSearch(candidates[best], candidate_ratios(awq)[best], losses)


def output_loss(x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec | None | list[QuantSpec | None],
                chunk: int = CANDIDATES_AT_ONCE) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain AWQ loss for linears sharing input x [T, K]: for each candidate s,
    sum over the linears of mean_t ||x_t (W_hat(s) - W)^T||^2 with W_hat(s) = scaled_quantized
    on `spec` (one grid for all, or one per linear: bits overrides; None for a linear kept in
    float, which adds no error). Candidates are evaluated `chunk` at a time to bound memory."""
    grids = spec if isinstance(spec, list) else [spec] * len(weights)
    weights, grids = [w for w, g in zip(weights, grids) if g is not None], [g for g in grids if g is not None]

    def loss(scales: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(scales.shape[0], dtype=torch.float64, device=scales.device)
        for start in range(0, scales.shape[0], chunk):
            part = scales[start : start + chunk]
            for W, grid in zip(weights, grids):
                delta = scaled_quantized(W, part, grid) - W.float()[None]  # [g, N, K]
                total[start : start + chunk] += (x.float() @ delta.transpose(1, 2)).square().sum((1, 2)).double() / x.shape[0]
        return total

    return loss


def clip_weights(W: torch.Tensor, x: torch.Tensor, spec: QuantSpec, awq: AWQSpec,
                 budget_elements: int = 2**26) -> torch.Tensor:
    """W [N, K] with each (row, group) clamped to +-max|w| (1 - i / clip_grid), i chosen per
    (row, group) to minimise its output error on the sample x [T, K]:

        err[n, g] = sum_t (x_t,g . d_n,g)^2 = d_n,g^T C_g d_n,g      d = Q(w_clip) - w,
        C_g = X_g^T X_g [width, width], the group's input second moment (`group_inputs`).

    Each candidate costs 2 N K min(T, width) flops: through C_g when T > width (built once,
    2 T K width flops), else through X_g directly. Rows are processed in blocks so that the
    projected errors [G, rows, min(T, width)] stay under `budget_elements`."""
    n, k = W.shape
    inputs = group_inputs(x, spec)
    rows = max(1, budget_elements // (spec.groups_for(k) * inputs.matrix.shape[-1]))
    return torch.cat([_clip_rows(W[start : start + rows], inputs, spec, awq) for start in range(0, n, rows)])


class GroupInputs(NamedTuple):
    """What the clip search projects each group's weight error d_g [n, width] on (`group_inputs`):
    matrix C_g = X_g^T X_g [G, width, width] when `second_moment` (err = sum((d_g C_g) * d_g)),
    else X_g^T [G, width, T] (err = sum((d_g X_g^T)^2)), summed over the last dim."""

    matrix: torch.Tensor
    second_moment: bool


def group_inputs(x: torch.Tensor, spec: QuantSpec) -> GroupInputs:
    """`GroupInputs` of the sample x [T, K] (the last group zero-padded): the second moments
    when T > width (accumulated in fp64, held in fp32), else the sample itself."""
    width = spec.group_width(x.shape[-1])
    xg = split_groups(x, spec).transpose(0, 1)  # [G, T, w]
    if xg.shape[1] > width:
        return GroupInputs(torch.bmm(xg.transpose(1, 2).double(), xg.double()).float(), True)
    return GroupInputs(xg.transpose(1, 2).contiguous(), False)


def _group_errors(delta: torch.Tensor, inputs: GroupInputs) -> torch.Tensor:
    """Output error per (row, group) [n, G] of the weight error delta [n, G, width] on the
    sample: d^T C d, or ||X d||^2 when the sample has at most width rows."""
    by_group = delta.transpose(0, 1)  # [G, n, w]
    projected = torch.bmm(by_group, inputs.matrix)  # [G, n, w] (d C) or [G, n, T] (X d)
    errors = (projected * by_group).sum(-1) if inputs.second_moment else projected.square().sum(-1)
    return errors.T.contiguous()


def _clip_rows(W: torch.Tensor, inputs: GroupInputs, spec: QuantSpec, awq: AWQSpec) -> torch.Tensor:
    """`clip_weights` for one block of rows W [n, K] (the grid is per row, so blocks are independent).

    Each (row, group) keeps the shrink that gave it the least error, which is right where a
    group's grid is its own. Q4_K's 8 groups of a 256-column super-block share its fp16 d and
    dmin, set by its largest group: clipping one moves the others' steps, so the per-group
    choices, put together, are evaluated once more and a super-block where they do worse than
    no clipping is left unclipped (`_unclip_coupled`)."""
    n, k = W.shape
    groups = spec.groups_for(k)
    Wg = split_groups(W, spec)
    limit = Wg.abs().amax(-1, keepdim=True)  # [n, G, 1]
    best_err = torch.full((n, groups), float("inf"), device=W.device)
    best = Wg.clone()
    for step in range(max(1, int(awq.max_shrink * awq.clip_grid))):
        bound = limit * (1 - step / awq.clip_grid)
        clipped = torch.maximum(torch.minimum(Wg, bound), -bound)
        q = rtn_fake(clipped.view(n, -1)[:, :k], spec)
        q = split_groups(q, spec)
        err = _group_errors(q - Wg, inputs)  # [n, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], clipped, best)
        if step == 0:
            unclipped_err = err
    if uses_k_grid(spec.k_quant, k):
        best = _unclip_coupled(best, Wg, unclipped_err, inputs, spec, k // SUPER_BLOCK)
    return best.view(n, -1)[:, :k].to(W.dtype)


def _unclip_coupled(best: torch.Tensor, Wg: torch.Tensor, unclipped_err: torch.Tensor, inputs: GroupInputs,
                    spec: QuantSpec, blocks: int) -> torch.Tensor:
    """`best` [n, G, width] with every (row, super-block) whose groups' errors, rounded together
    with their chosen clips, sum above its unclipped error reset to the unclipped weights Wg
    (super-blocks are independent of each other: each has its own d and dmin)."""
    n, groups, width = best.shape
    together = _group_errors(rtn_fake(best.view(n, -1), spec).view(n, groups, width) - Wg, inputs)
    worse = together.view(n, blocks, -1).sum(-1) > unclipped_err.view(n, blocks, -1).sum(-1)  # [n, blocks]
    return torch.where(worse.repeat_interleave(groups // blocks, dim=1)[..., None], Wg, best)


def fold_into_norm(norm_weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """RMSNorm weight [K] divided by s: the norm's output becomes x / s."""
    return norm_weight / scales.to(norm_weight.dtype)


def fold_into_previous_linear(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A producing linear's weight [K, K_in] with its output rows divided by s (v -> o, up -> down)."""
    return weight / scales.to(weight.dtype)[:, None]


def scale_columns(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A consuming linear's weight [N, K] with its input columns multiplied by s."""
    return weight * scales.to(weight.dtype)[None, :]
