"""AWQ: activation-aware per-channel scales and clipping, as pure tensor functions.

For linears y = x W^T that read the same input x [T, K], a positive scale s [K] per input
channel leaves the float function unchanged when x is divided by s upstream (folded into
the previous norm or linear) and W's columns are multiplied by s:  (x / s)(W diag(s))^T.
Quantization error then lands on W diag(s): channels with large |x| get larger weights,
hence relatively finer steps. The search tries s = mean|x|^alpha (or, with duo scaling,
mean|x|^alpha / mean|w|^(1-alpha)) for alpha = 0, 1/grid, ..., normalised so that
sqrt(max(s) min(s)) = 1, and keeps the alpha whose quantized output is closest to the float
one under a loss the CALLER supplies (the linears' outputs, a whole MoE block...). alpha = 0
is s = 1, i.e. plain RTN, so the chosen scales never do worse than RTN on that loss.

Clipping then shrinks each (row, group) range to max|w| (1 - i/clip_grid) where that
lowers the output error ||X_g (Q(w_g) - w_g)||^2 on sampled inputs.

Nothing here touches modules, hooks or disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from maverick_quant.compress.grid import group_params, quantize_grouped, rtn_quantize
from maverick_quant.compress.kquant import offset_grid_params
from maverick_quant.recipe import AWQSpec, QuantSpec


@dataclass(frozen=True)
class ScaleSearch:
    """scales [K] chosen; ratio the alpha that gave them; losses [grid] of every candidate."""

    scales: torch.Tensor
    ratio: float
    losses: torch.Tensor


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, awq: AWQSpec) -> torch.Tensor:
    """Scales [grid, K] for alpha = i / grid from mean|x| [K] (and mean|w| [K] for duo scaling)."""
    ratios = torch.arange(awq.grid, dtype=torch.float64, device=x_mean.device)[:, None] / awq.grid
    x = x_mean.double().clamp_min(1e-4)[None]
    if awq.duo_scaling:
        scales = x**ratios / w_mean.double().clamp_min(1e-4)[None] ** (1 - ratios)
    else:
        scales = x**ratios
    scales = scales.clamp_min(1e-4)
    return (scales / (scales.amax(1, keepdim=True) * scales.amin(1, keepdim=True)).sqrt()).float()


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
    return ScaleSearch(candidates[best], best / awq.grid, losses)


def output_loss(x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec | list[QuantSpec],
                chunk: int = CANDIDATES_AT_ONCE) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain AWQ loss for linears sharing input x [T, K]: for each candidate s,
    sum over the linears of mean_t ||x_t (W_hat(s) - W)^T||^2 with W_hat(s) = scaled_quantized
    on `spec` (one grid for all, or one per linear: bits overrides). Candidates are evaluated
    `chunk` at a time to bound memory."""
    grids = spec if isinstance(spec, list) else [spec] * len(weights)

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
    (row, group) to minimise sum_t (x_t,g . (Q(w_clip) - w)_g)^2 over the sample x [T, K].
    Rows are processed in blocks so the error tensor [T, rows, G] stays under `budget_elements`."""
    n, k = W.shape
    groups = spec.groups_for(k)
    rows = max(1, budget_elements // max(1, x.shape[0] * groups))
    return torch.cat([_clip_rows(W[start : start + rows], x, spec, awq) for start in range(0, n, rows)])


def _clip_rows(W: torch.Tensor, x: torch.Tensor, spec: QuantSpec, awq: AWQSpec) -> torch.Tensor:
    """`clip_weights` for one block of rows W [n, K] (the grid is per row, so blocks are independent)."""
    n, k = W.shape
    width = spec.group_width(k)
    groups = spec.groups_for(k)
    pad = groups * width - k
    Wg = torch.nn.functional.pad(W.float(), (0, pad)).view(n, groups, width)
    xg = torch.nn.functional.pad(x.float(), (0, pad)).view(-1, groups, width)  # [T, G, width]
    limit = Wg.abs().amax(-1, keepdim=True)  # [n, G, 1]
    best_err = torch.full((n, groups), float("inf"), device=W.device)
    best = Wg.clone()
    for step in range(max(1, int(awq.max_shrink * awq.clip_grid))):
        bound = limit * (1 - step / awq.clip_grid)
        clipped = torch.maximum(torch.minimum(Wg, bound), -bound)
        q = rtn_fake(clipped.view(n, -1)[:, :k], spec)
        q = torch.nn.functional.pad(q, (0, pad)).view(n, groups, width)
        err = torch.einsum("tgw,ngw->tng", xg, q - Wg).square().sum(0)  # [n, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], clipped, best)
    return best.view(n, -1)[:, :k].to(W.dtype)


def fold_into_norm(norm_weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """RMSNorm weight [K] divided by s: the norm's output becomes x / s."""
    return norm_weight / scales.to(norm_weight.dtype)


def fold_into_previous_linear(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A producing linear's weight [K, K_in] with its output rows divided by s (v -> o, up -> down)."""
    return weight / scales.to(weight.dtype)[:, None]


def scale_columns(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A consuming linear's weight [N, K] with its input columns multiplied by s."""
    return weight * scales.to(weight.dtype)[None, :]
