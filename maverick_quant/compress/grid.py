"""Quantization grids: per-row (scale, zero) parameters, rounding, and round-to-nearest.

A grid maps a real weight w to an integer code and back:

    code  = clamp(round(w / scale) + zero, 0, maxq)        maxq = 2^bits - 1
    w_hat = (code - zero) * scale

Scales are rounded to fp16 *before* they are used, so the fp16 scales a checkpoint stores
dequantize bit-exactly to the weights the solvers computed (and error-compensated) against.
Everything here is shape-generic over leading batch dims and keeps the input's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maverick_quant.compress.finite import all_finite
from maverick_quant.compress.types import QuantizedWeight, group_index
from maverick_quant.recipe import QuantSpec

FP16_TINY = 2.0**-14  # smallest positive normal fp16: keeps 1/scale finite and scales normal
FP16_MAX = 65504.0  # largest finite fp16
# the range search of QuantSpec.clip_search: GPTQ's reference values (grid 100, maxshrink 0.8, norm 2.4)
CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM = 100, 0.8, 2.4


def fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    """`scale` (fp32, any shape) rounded to the nearest fp16 value with magnitude in
    [FP16_TINY, FP16_MAX], keeping its sign (a signed-max grid's scales may be negative)."""
    sign = torch.where(scale < 0, -1.0, 1.0)
    return (sign * scale.abs().clamp(FP16_TINY, FP16_MAX)).half().float()


def round_significand(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """`scale` rounded away from zero to `bits` significant bits (11 or more: unchanged for
    fp16 values). Rounding the magnitude up keeps the group's range inside the grid."""
    if bits >= 11:
        return scale
    mantissa, exponent = torch.frexp(scale.abs())  # |scale| = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.sign(scale) * torch.ldexp(torch.ceil(mantissa * 2.0**bits) / 2.0**bits, exponent)


def quant_params(w: torch.Tensor, bits: int, sym: bool, scale_bits: int = 11,
                 signed_scale: bool = False, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid of each row of `w` [..., N, C] -> (scale fp32 [..., N], zero fp32 [..., N]).

    As in GPTQ the range always contains 0: xmin = min(min_c w, 0), xmax = max(max_c w, 0).
      symmetric:  amax = max(|xmin|, xmax), scale = 2 * amax / maxq, zero = 2^(bits-1)
      signed max: (symmetric, `signed_scale`, llama.cpp's Q4_0 rule) m = the row's value of
                  largest magnitude, scale = m / -2^(bits-1) (negative when m > 0), zero =
                  2^(bits-1): m is exactly code 0, and the step is amax / 2^(bits-1) instead
                  of amax / (2^(bits-1) - 1/2); values of the other sign reach code maxq
      asymmetric: scale = (xmax - xmin) / maxq, zero = clamp(round(-xmin / scale), 0, maxq)
    `shrink` p in (0, 1] narrows the range before the scale is taken (xmin, xmax, m times p;
    the values outside are clipped to the extreme codes), for `search_params`.
    All-zero rows get the range [-1, 1] (as GPTQ does; signed max: scale 1) instead of dividing by zero.
    `zero` is integer-valued; `scale` is fp16-exact (see `fp16_exact`) with at most
    `scale_bits` significant bits (see QuantSpec.scale_bits).
    """
    maxq = (1 << bits) - 1
    w = w.float()
    if sym and signed_scale:
        return _signed_max_params(w, bits, scale_bits, shrink)
    xmin = w.amin(dim=-1).clamp(max=0.0) * shrink
    xmax = w.amax(dim=-1).clamp(min=0.0) * shrink
    if sym:
        amax = torch.maximum(-xmin, xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = fp16_exact(round_significand(fp16_exact(2.0 * amax / maxq), scale_bits))
        return scale, torch.full_like(scale, float((maxq + 1) // 2))
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = fp16_exact(round_significand(fp16_exact((xmax - xmin) / maxq), scale_bits))
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _signed_max_params(w: torch.Tensor, bits: int, scale_bits: int,
                       shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed-max symmetric grid of `quant_params` for rows of `w` [..., N, C]."""
    half = float(1 << (bits - 1))
    m = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1) * shrink
    m = torch.where(m == 0, -torch.full_like(m, half), m)  # all-zero rows: scale 1 (any scale codes them as 0)
    scale = fp16_exact(round_significand(fp16_exact(m / -half), scale_bits))
    return scale, torch.full_like(scale, half)


def search_params(w: torch.Tensor, bits: int, sym: bool, scale_bits: int = 11, signed_scale: bool = False,
                  importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quant_params` of each row of `w` [..., N, C] with its range shrunk by the p in
    {1 - i / CLIP_GRID : i < CLIP_MAX_SHRINK * CLIP_GRID} that minimises the row's
    sum_c a_c |w_c - fake_quantize(w)_c|^CLIP_NORM -> (scale, zero) [..., N], as `quant_params`;
    a = `importance` (broadcast against w, e.g. [..., 1, C]: GPTQ passes H_cc = E[x_c^2]), or 1.

    p = 1 (plain min/max) is tried first and kept on ties, so the error never exceeds
    min/max's. Memory: a few copies of `w`; time: CLIP_MAX_SHRINK * CLIP_GRID passes over it.
    """
    w = w.float()
    maxq = (1 << bits) - 1
    best_scale, best_zero, best_err = None, None, None
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        scale, zero = quant_params(w, bits, sym, scale_bits, signed_scale, shrink=1.0 - i / CLIP_GRID)
        err = (fake_quantize(w, scale[..., None], zero[..., None], maxq) - w).abs_().pow_(CLIP_NORM)
        err = (err if importance is None else err * importance).sum(dim=-1)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        best_err = torch.minimum(err, best_err)
    return best_scale, best_zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes clamp(round(w / scale) + zero, 0, maxq), as floats of w's dtype.

    `scale` and `zero` broadcast against `w` with ordinary torch rules: for a per-row grid
    on w [..., N, C] pass scale[..., None]; for one column w [..., N] pass scale [..., N].
    Rounding is torch.round (half to even), as in GPTQ.
    """
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = (codes - zero) * scale (broadcast as in `quantize_codes`), in fp32.

    Same operation order as `QuantizedWeight.dequantize`, so the results agree bit-exactly.
    """
    return (codes.float() - zero.float()) * scale.float()


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """w snapped to its grid: dequantize_codes(quantize_codes(w, ...), ...)."""
    return dequantize_codes(quantize_codes(w, scale, zero, maxq), scale, zero)


def expand_groups(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Per-group values t [..., N, G] -> per-column values [..., N, K] (t[..., n, k // group_size])."""
    return t.index_select(-1, group_index(in_features, group_size, t.device))


def group_params(W: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of each group of `spec.group_size` columns of W [..., N, K] -> (scales, zeros) fp32 [..., N, G].

    The last group may be shorter (K=576, group 128 -> G=5, last group 64 columns). It is
    zero-padded to full width, which changes nothing since the range always contains 0 (and
    0 is always exactly on the grid, so the padding adds no error to `search_params`).
    `spec.clip_search`: each group's range is searched (`search_params`), else its min/max;
    `importance` [..., K] (one value per column, shared by the rows) weights that search.
    """
    k = W.shape[-1]
    width, groups = spec.group_width(k), spec.groups_for(k)
    padded = F.pad(W.float(), (0, groups * width - k))
    grouped = padded.unflatten(-1, (groups, width))
    if not spec.clip_search:
        return quant_params(grouped, spec.bits, spec.sym, spec.scale_bits, spec.signed_scale)
    if importance is not None:  # [..., K] -> [..., 1, G, width], shared by the rows
        importance = F.pad(importance.float(), (0, groups * width - k)).unflatten(-1, (groups, width)).unsqueeze(-3)
    return search_params(grouped, spec.bits, spec.sym, spec.scale_bits, spec.signed_scale, importance)


def pack_quantized(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Solver outputs (integer-valued floats: codes [..., N, K], scales/zeros [..., N, G]) -> QuantizedWeight.

    Contiguous, as a weight read back from a bundle file is: matmuls on a transposed layout
    round differently, and a resumed run mixes weights solved now with weights read back."""
    return QuantizedWeight(
        codes=codes.to(torch.uint8).contiguous(),
        scales=scales.half().contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        bits=spec.bits,
        group_size=spec.group_size,
    )


def rtn_quantize(W: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest W [..., N, K] on the group grid of `spec` (act_order, damp, block_size unused),
    or on llama.cpp's Q4_K / Q4_1 offset grid (compress/kquant.py) for a k_quant or free_min spec."""
    from maverick_quant.compress.kquant import offset_grid_params, rtn_quantize_k  # kquant builds on this module

    if not all_finite(W):  # a NaN would round to code 0 and an inf to a 65504 scale, silently
        raise ValueError(f"RTN: weight [{', '.join(map(str, W.shape))}] contains NaN/Inf")
    k = W.shape[-1]
    offset_params = offset_grid_params(spec, k)
    if offset_params is not None:
        return rtn_quantize_k(W, offset_params)
    scales, zeros = group_params(W, spec)
    return pack_quantized(quantize_grouped(W, scales, zeros, spec).flatten(-2)[..., :k], scales, zeros, spec)


def quantize_grouped(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes of W [..., N, K] on its groups' grid (scales, zeros) [..., N, G]: quantize_codes
    on the zero-padded grouped view, integer-valued fp32 [..., N, G, width], computed in one
    temporary (w / s, round, + z, clamp in place) instead of per-column copies of the scales
    and zeros. `.flatten(-2)[..., :K]` gives them in column order."""
    k = W.shape[-1]
    width, groups = spec.group_width(k), spec.groups_for(k)
    grouped = F.pad(W.float(), (0, groups * width - k)).unflatten(-1, (groups, width))
    return grouped.div(scales[..., None]).round_().add_(zeros[..., None]).clamp_(0, spec.maxq)
