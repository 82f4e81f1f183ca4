"""GPTQ (Frantar et al., 2022): column-by-column quantization with second-order error feedback.

For one weight W [N, K] and the input Hessian H = mean_t x_t x_t^T [K, K], GPTQ minimizes
tr((W - Q) H (W - Q)^T) = mean_t ||(W - Q) x_t||^2 greedily: it quantizes column k, then
spreads the rounding error over the not-yet-quantized columns j > k through the inverse
Hessian, using the upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1:

    err_k = (w_k - q_k) / U[k, k]          w_j -= err_k * U[k, j]   (j > k)

Updates are applied lazily per block of columns (one matmul per block). Everything is
batched over leading dims (MoE experts W [E, N, K], H [E, K, K]): the column loop runs once
for the whole batch. The solve runs in fp32 on the inputs' device: damping keeps H's
condition number bounded (~K/damp), which fp32 Cholesky handles; failures are detected
per matrix and retried with more damping.

Internally W is held transposed, Wt [B, K, N], so a column of W is a contiguous row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maverick_quant.compress.finite import all_finite, finite_each
from maverick_quant.compress.grid import (dequantize_codes, expand_groups, group_params, pack_quantized, quantize_codes,
                                          rtn_quantize)
from maverick_quant.compress.kquant import (GROUP, KQuantParams, concat_params, dequantize_offset, kquant_params,
                                            offset_grid_params, pack_kquant, quantize_offset)
from maverick_quant.compress.types import SUPER_BLOCK, QuantizedWeight, concat_leading
from maverick_quant.recipe import QuantSpec

MAX_DAMP = 1.0


@dataclass(frozen=True)
class GPTQResult:
    """Outcome of `gptq_quantize` for W [..., N, K]; the per-matrix stats have shape [...].

    weight:   the quantized weight (codes in original column order, trivial g_idx).
    loss:     fp32 tr((W - Q) H (W - Q)^T) with the undamped H = mean over tokens of ||(W - Q) x||^2.
    rel_loss: fp32 loss / tr(W H W^T) (0 where W H W^T is 0).
    damp:     fp64 relative damping actually used (spec.damp, or 10x steps of it up to 1.0).
    """

    weight: QuantizedWeight
    loss: torch.Tensor
    rel_loss: torch.Tensor
    damp: torch.Tensor


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> GPTQResult:
    """Quantize W [..., N, K] against Hessians H [..., K, K] on the grid of `spec`.

    Dead inputs (H_kk == 0) get a zeroed W column (`_mask_dead_inputs`). With spec.act_order the
    columns are solved by decreasing diag(H), on static groups computed up front from W;
    otherwise each group's grid is computed from the error-updated W when the solve reaches
    the group's first column. Raises ValueError on bad shapes, non-finite input, or an H
    that stays non positive-definite with damp 1.0.
    """
    batch, n, k = _check_inputs(W, H)
    Wt = W.reshape(-1, n, k).float().transpose(1, 2).clone(memory_format=torch.contiguous_format)  # [B, K, N]
    Hd = H.reshape(-1, k, k).float().clone()
    _mask_dead_inputs(Wt, Hd)
    offset_params = offset_grid_params(spec, k)
    importance = torch.diagonal(Hd, dim1=-2, dim2=-1).clone() if spec.clip_search else None  # [B, K]: E[x_k^2]
    grid = _GroupGrid(spec, k, importance) if offset_params is None else _OffsetGrid(offset_params)
    params = grid.columns(Wt) if _static(spec) else None
    perm = _act_order_perm(Hd) if spec.act_order else None
    if perm is not None:
        Wt, Hd = _permute_rows(Wt, perm), _permute_rows(_permute_rows(Hd, perm).transpose(1, 2), perm)
        params = tuple(_permute_rows(p, perm) for p in params)
    U, damp = _damped_inverse_cholesky(Hd, spec.damp)
    del Hd
    codes, scale, zero = _solve(Wt, U, params, grid, spec.block_size)
    if perm is not None:
        inverse = torch.argsort(perm, dim=-1)
        codes, scale, zero = (_permute_rows(t, inverse) for t in (codes, scale, zero))
    Q = grid.dequantize(codes, scale, zero).transpose(1, 2)  # [B, N, K], == weight.dequantize()
    weight = grid.pack(codes, scale, zero).map_tensors(lambda t: t.reshape(*batch, n, -1))
    loss, rel_loss = _losses(W.reshape(-1, n, k).float(), Q, H.reshape(-1, k, k).float())
    return GPTQResult(weight, loss.reshape(batch), rel_loss.reshape(batch), damp.reshape(batch))


def identity_solve(W: torch.Tensor, spec: QuantSpec) -> GPTQResult:
    """`gptq_quantize(W, I, spec)` for W [..., N, K] in closed form, bit for bit (tested).

    With H = I the damped inverse (H + damp I)^-1 = I / (1 + damp) has the diagonal upper
    Cholesky factor U = I / sqrt(1 + damp): every update w_j -= err_k U[k, j] (j > k) is zero,
    so no column's rounding error reaches another, each group's grid is taken from W itself
    (clip_search weighs the columns by diag(H) = 1, i.e. not at all) and act_order's stable
    sort keeps the column order: the solve is round to nearest (`rtn_quantize`). The loss is
    tr((W - Q) I (W - Q)^T) = ||W - Q||_F^2, rel_loss that / ||W||_F^2, damp spec.damp (the
    first factorization of I always succeeds). One rounding pass instead of the solve's
    K^3 + 2 N K^2 flops and K sequential column steps.
    """
    batch, n, k = _check_inputs(W, None)
    weight = rtn_quantize(W, spec)
    Q = weight.dequantize().reshape(-1, n, k)
    loss, rel_loss = _losses(W.reshape(-1, n, k).float(), Q, None)
    damp = torch.full(loss.shape, spec.damp, dtype=torch.float64, device=W.device)
    return GPTQResult(weight, loss.reshape(batch), rel_loss.reshape(batch), damp.reshape(batch))


def gptq_quantize_each(W: torch.Tensor, H: torch.Tensor | None, solved: list[int], spec: QuantSpec) -> GPTQResult:
    """GPTQ the matrices W[solved] [E_s, N, K] of W [E, N, K] against H [E_s, K, K] as one
    batch, and round the others to nearest (H = I, by `identity_solve`: the same result as
    solving them against I, without the solve); the results in W's order [E]."""
    chosen = set(solved)
    rounded = [e for e in range(W.shape[0]) if e not in chosen]
    if not rounded:
        return gptq_quantize(W, H, spec)
    if not solved:
        return identity_solve(W, spec)
    parts = [gptq_quantize(W[solved], H, spec), identity_solve(W[rounded], spec)]
    order = torch.argsort(torch.tensor(solved + rounded, device=W.device))  # part position of each matrix
    return GPTQResult(concat_leading([part.weight for part in parts])[order],
                      *(torch.cat([getattr(part, f) for part in parts])[order] for f in ("loss", "rel_loss", "damp")))


class _GroupGrid:
    """The (scale, zero) group grid as the column loop sees it: per-column parameters [B, C, N]."""

    def __init__(self, spec: QuantSpec, k: int, importance: torch.Tensor | None = None):
        self.spec, self.width, self.importance = spec, spec.group_width(k), importance

    def columns(self, Wt: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column (scale, zero) [B, C, N] of the groups of the columns Wt [B, C, N], which
        are columns [first, first + C) of the matrix (for their `importance`)."""
        importance = None if self.importance is None else self.importance[:, first : first + Wt.shape[1]]
        scales, zeros = group_params(Wt.transpose(1, 2), self.spec, importance)  # [B, N, G]
        c = Wt.shape[1]
        return tuple(expand_groups(t, c, self.spec.group_size).transpose(1, 2).contiguous() for t in (scales, zeros))

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return quantize_codes(w, scale, zero, self.spec.maxq)

    dequantize = staticmethod(dequantize_codes)

    def pack(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> QuantizedWeight:
        """Solver outputs [B, K, N] -> QuantizedWeight [B, N, K] (one scale and zero per group)."""
        return pack_quantized(codes.transpose(1, 2), scale[:, :: self.width].transpose(1, 2),
                              zero[:, :: self.width].transpose(1, 2), self.spec)


class _OffsetGrid:
    """A llama.cpp offset grid (Q4_K or Q4_1, compress/kquant.py) as the column loop sees it:
    per-column (step, offset) [B, C, N]; each super-block's parameters are kept, in column
    order, to pack. `grid_params` maps columns [..., N, C] to their KQuantParams."""

    def __init__(self, grid_params):
        self.grid_params = grid_params
        self.width = SUPER_BLOCK if grid_params is kquant_params else GROUP
        self.parts: list[KQuantParams] = []

    def columns(self, Wt: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.grid_params(Wt.transpose(1, 2))
        self.parts.append(params)
        return tuple(t.transpose(1, 2) for t in params.column_steps())

    quantize = staticmethod(quantize_offset)
    dequantize = staticmethod(dequantize_offset)

    def pack(self, codes: torch.Tensor, _step: torch.Tensor, _offset: torch.Tensor) -> QuantizedWeight:
        return pack_kquant(codes.transpose(1, 2), concat_params(self.parts))


def _check_inputs(W: torch.Tensor, H: torch.Tensor | None) -> tuple[tuple[int, ...], int, int]:
    """Validate W [..., N, K] against H [..., K, K] (None: H = I); return (batch dims, N, K)."""
    if W.dim() < 2:
        raise ValueError(f"GPTQ: weight must be [..., N, K], got shape {tuple(W.shape)}")
    *batch, n, k = W.shape
    if H is not None and tuple(H.shape) != (*batch, k, k):
        raise ValueError(
            f"GPTQ: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}; expected {(*batch, k, k)}"
        )
    if not (all_finite(W) and (H is None or all_finite(H))):
        raise ValueError("GPTQ: weight or Hessian contains NaN/Inf; check the calibration activations")
    return tuple(batch), n, k


def _mask_dead_inputs(Wt: torch.Tensor, H: torch.Tensor) -> None:
    """In place: inputs never seen (H_kk == 0) get a zero weight column (Wt [B, K, N]) and H_kk =
    the mean of the seen inputs' H_kk.

    Such a column contributes nothing to the loss, and the filled diagonal keeps H invertible
    while leaving mean(diag H), which scales the damping, at the seen inputs' mean: the unit
    fill of the original GPTQ dominated it where activations are small (137x the damping
    asked for at K = 512 with 16 dead inputs of scale 1e-2). A matrix that saw no input at
    all (H = 0: e.g. an expert's down projection whose gate/up are zero) is solved against the
    identity instead, i.e. rounded to nearest: zeroing its whole weight would have been a
    silent guess, and its loss is 0 either way.
    """
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    seen = (~dead).sum(-1, keepdim=True)
    none_seen = seen == 0  # [B, 1]
    dead &= ~none_seen
    fill = torch.where(none_seen, 1.0, diag.sum(-1, keepdim=True) / seen.clamp_min(1))  # dead entries add 0
    diag.copy_(torch.where(dead | none_seen, fill, diag))
    Wt.masked_fill_(dead.unsqueeze(-1), 0.0)


def _static(spec: QuantSpec) -> bool:
    """Whether grids are fixed before the solve (act-order, or one group per row as in GPTQ)."""
    return spec.act_order or spec.group_size == -1


def _act_order_perm(H: torch.Tensor) -> torch.Tensor:
    """Solve order [B, K]: columns by decreasing diag(H) (stable, so ties keep column order)."""
    return torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)


def _permute_rows(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """t [B, K, M] with its rows reordered: out[b, i] = t[b, perm[b, i]]."""
    return t.gather(1, perm.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def _damped_inverse_cholesky(H: torch.Tensor, damp0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U [B, K, K] of (H + damp * mean(diag H) * I)^-1, and damp fp64 [B].

    damp starts at `damp0`; matrices whose factorization fails (H or its inverse not
    numerically positive-definite) retry with 10x damp, capped at MAX_DAMP, and only those.
    """
    b = H.shape[0]
    damp = torch.full((b,), damp0, dtype=torch.float64, device=H.device)
    mean_diag = H.diagonal(dim1=-2, dim2=-1).mean(-1)
    U, todo = None, torch.arange(b, device=H.device)
    while True:  # the first try factors every matrix in place of U; retries only the failed ones
        factor, ok = _try_inverse_cholesky(H if U is None else H[todo], (damp[todo] * mean_diag[todo]).to(H.dtype))
        if U is None:
            U = factor
        else:
            U[todo[ok]] = factor[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            return U, damp
        if (damp[todo] >= MAX_DAMP).any():
            raise ValueError(
                f"GPTQ: Hessian is not positive-definite even with damp={MAX_DAMP} "
                f"(batch elements {todo.tolist()}); the calibration activations are likely degenerate"
            )
        damp[todo] = (damp[todo] * 10).clamp(max=MAX_DAMP)


def _try_inverse_cholesky(H: torch.Tensor, add: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each H [B, K, K] + add[b] * I: (upper Cholesky of its inverse [B, K, K], ok bool [B]).
    At most two [B, K, K] temporaries live at once beside H (the solve of a Maverick expert's
    down projection holds a handful of 256 MiB matrices)."""
    L = H.clone()
    L.diagonal(dim1=-2, dim2=-1).add_(add.unsqueeze(-1))
    L, info = torch.linalg.cholesky_ex(L)
    failed = info != 0
    if failed.any():  # failed factors are garbage: keep them finite
        L[failed] = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    inverse = torch.cholesky_inverse(L)
    del L
    U, info_inv = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    return U, (info == 0) & (info_inv == 0) & finite_each(U)


def _block_bounds(k: int, block_size: int, break_every: int) -> list[tuple[int, int]]:
    """Lazy-update blocks [(i1, i2)] of at most `block_size` columns covering 0..k, also cut at
    every multiple of `break_every`, so a dynamic group always starts a block: then no lazy
    update is pending and its grid sees the fully updated weights (the reference code instead
    reads stale columns when a group starts mid-block)."""
    bounds, i1 = [], 0
    while i1 < k:
        i2 = min(i1 + block_size, k, (i1 // break_every + 1) * break_every)
        bounds.append((i1, i2))
        i1 = i2
    return bounds


def _solve(
    Wt: torch.Tensor, U: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor] | None,
    grid: "_GroupGrid | _OffsetGrid", block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ column loop on Wt [B, K, N] (updated in place) in solve order.

    params: static per-column grid parameters [B, K, N], or None to compute each group's (or
    super-block's) grid when its first column is reached. Returns (codes, params...), each [B, K, N] fp32.
    """
    b, k, n = Wt.shape
    dynamic = params is None
    width = grid.width
    scale, zero = (torch.empty_like(Wt), torch.empty_like(Wt)) if dynamic else params
    codes = torch.empty_like(Wt)
    for i1, i2 in _block_bounds(k, block_size, width if dynamic else k):
        if dynamic and i1 % width == 0:
            scale[:, i1 : i1 + width], zero[:, i1 : i1 + width] = grid.columns(Wt[:, i1 : i1 + width], i1)
        W1, U1 = Wt[:, i1:i2], U[:, i1:i2, i1:i2]
        err = torch.empty_like(W1)  # scaled errors (w - q) / U_kk of the block's columns
        for i in range(i2 - i1):
            w, col = W1[:, i], i1 + i
            codes[:, col] = grid.quantize(w, scale[:, col], zero[:, col])
            err[:, i] = (w - grid.dequantize(codes[:, col], scale[:, col], zero[:, col])) / U1[:, i, i, None]
            # w_j -= err * U[i, j] for the block's remaining columns j > i (rank-1 update)
            W1[:, i + 1 :].sub_(U1[:, i, i + 1 :, None] * err[:, i, None, :])
        # lazy update of all later columns: W[:, i2:] -= Err @ U[i1:i2, i2:] (transposed)
        Wt[:, i2:].baddbmm_(U[:, i1:i2, i2:].transpose(1, 2), err, alpha=-1.0)
    return codes, scale, zero


def _losses(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tr((W-Q) H (W-Q)^T), that / tr(W H W^T)) per matrix, for W, Q [B, N, K], undamped H
    [B, K, K] or None for H = I. E @ I is E exactly, laid out as a matmul's output (contiguous): for
    H = I that copy stands in for the matmul, so that the sums add in the same order, bit for bit,
    when W is a strided view (an expert's slice of a fused tensor)."""
    E = W - Q
    loss = ((E.contiguous() if H is None else E @ H) * E).sum(dim=(-2, -1))
    total = ((W.contiguous() if H is None else W @ H) * W).sum(dim=(-2, -1))
    rel = torch.where(total > 0, loss / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(loss))
    return loss, rel
