"""llama.cpp's K-quant grid (Q4_K): super-blocks of 256 columns, 8 groups of 32 each.

Per row and super-block s, two fp16 numbers (d_s, dmin_s); per group g of 32 columns two
6-bit integers (sc_g, m_g) in 0..63; per weight a 4-bit code q in 0..15:

    w_hat = q * (d_s * sc_g) - dmin_s * m_g                  (fp32, llama.cpp's order)

A group's step is S_g = d_s * sc_g and its offset M_g = dmin_s * m_g >= 0, so the group
stores the values {q * S_g - M_g}; both products are exact in fp32 (11 x 6 bits).

Parameters are chosen as llama.cpp's reference quantizer does, without its search:
  group range [xmin, xmax], xmin = min(min_c w, 0), xmax = max_c w;
  step_g = (xmax - xmin) / 15, offset_g = -xmin;
  d = fp16(max_g step_g / 63), sc_g = round(step_g / d);  dmin = fp16(max_g offset_g / 63),
  m_g = round(offset_g / dmin)   (0 where d or dmin is 0);
and a weight rounds to q = clamp(round((w + M_g) / S_g), 0, 15) (q = 0 where S_g = 0).
GPTQ uses the same rounding column by column, with each super-block's parameters computed
from the error-updated weights when the solve reaches it (see compress/gptq.py).

llama.cpp's Q4_1 is the same kind of offset grid with one group of 32 per super-block and
unit multipliers (sc = m = 1): w_hat = q * d - dmin, gguf-py's `q * d + m` with m = -dmin.
Its parameters are those of llama.cpp's reference quantizer: the group's own range, not
widened to contain 0: d = fp16((max_c w - min_c w) / 15), m = fp16(min_c w).
A Q4_K spec solves matrices whose K is not a multiple of 256 on this Q4_1 grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from maverick_quant.compress.grid import FP16_MAX
from maverick_quant.compress.types import SUPER_BLOCK, QuantizedWeight
from maverick_quant.recipe import QuantSpec

GROUP = 32
GROUPS_PER_SUPER = SUPER_BLOCK // GROUP
MAX_CODE = 15
MAX_MULTIPLIER = 63  # 6-bit sc and m


@dataclass(frozen=True)
class KQuantParams:
    """Offset grid of W [..., N, K] with S super-blocks of P groups of 32 (Q4_K: P = 8; Q4_1: P = 1):
    d, dmin fp32 (fp16-exact) [..., N, S]; sc, m fp32 integer-valued [..., N, P S]."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor

    def group_steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S_g = d * sc, M_g = dmin * m), each fp32 [..., N, P S]."""
        per_super = self.sc.shape[-1] // self.d.shape[-1]
        d = self.d.repeat_interleave(per_super, dim=-1)
        dmin = self.dmin.repeat_interleave(per_super, dim=-1)
        return d * self.sc, dmin * self.m

    def column_steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, M) of every column, fp32 [..., N, K]."""
        return tuple(t.repeat_interleave(GROUP, dim=-1) for t in self.group_steps())


def uses_k_grid(k_quant: bool, in_features: int) -> bool:
    """Whether a matrix with `in_features` columns is solved on the K-quant grid (its K is a
    multiple of 256); a k_quant spec puts the others on the Q4_1 grid."""
    return k_quant and in_features % SUPER_BLOCK == 0


def offset_grid_params(spec: QuantSpec, in_features: int) -> Callable[[torch.Tensor], KQuantParams] | None:
    """The parameter function of the llama.cpp offset grid a matrix with `in_features` columns is
    solved on under `spec`: `kquant_params` (k_quant, K a multiple of 256), `q4_1_params` (free_min,
    or k_quant with any other K), or None for the (scale, zero) group grid."""
    if uses_k_grid(spec.k_quant, in_features):
        return kquant_params
    return q4_1_params if spec.k_quant or spec.free_min else None


def concat_params(parts: list[KQuantParams]) -> KQuantParams:
    """Parameters of consecutive column ranges -> the parameters of their concatenation."""
    return KQuantParams(*(torch.cat([getattr(p, f) for p in parts], dim=-1) for f in ("d", "dmin", "sc", "m")))


def kquant_params(w: torch.Tensor) -> KQuantParams:
    """The K-quant grid of w [..., N, K] (K a multiple of 256), from each group's min/max."""
    k = w.shape[-1]
    if k % SUPER_BLOCK:
        raise ValueError(f"Q4_K super-blocks hold {SUPER_BLOCK} columns; K={k} is not a multiple of {SUPER_BLOCK}")
    groups = w.float().unflatten(-1, (-1, GROUP))  # [..., N, G, 32]
    xmin = groups.amin(dim=-1).clamp(max=0.0)
    xmax = groups.amax(dim=-1)
    d, sc = _six_bit_multipliers((xmax - xmin) / MAX_CODE)
    dmin, m = _six_bit_multipliers(-xmin)
    return KQuantParams(d, dmin, sc, m)


def q4_1_params(w: torch.Tensor) -> KQuantParams:
    """llama.cpp's Q4_1 grid of w [..., N, K] (K a multiple of 32) from each group's own min/max:
    d = fp16((max - min) / 15), dmin = fp16(-min) (the block's m is -dmin), sc = m = 1."""
    k = w.shape[-1]
    if k % GROUP:
        raise ValueError(f"Q4_1 blocks hold {GROUP} columns; K={k} is not a multiple of {GROUP}")
    groups = w.float().unflatten(-1, (-1, GROUP))  # [..., N, G, 32]
    xmin, xmax = groups.amin(dim=-1), groups.amax(dim=-1)
    d = ((xmax - xmin) / MAX_CODE).clamp(max=FP16_MAX).half().float()
    dmin = (-xmin).clamp(-FP16_MAX, FP16_MAX).half().float()
    ones = torch.ones_like(d)
    return KQuantParams(d, dmin, ones, ones)


def _six_bit_multipliers(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative per-group values [..., N, G] -> (fp16-exact unit per super-block [..., N, G/8],
    integer multipliers in 0..63 [..., N, G]) with unit * multiplier ~= value."""
    per_super = values.unflatten(-1, (-1, GROUPS_PER_SUPER))  # [..., N, S, 8]
    unit = (per_super.amax(dim=-1) / MAX_MULTIPLIER).clamp(max=FP16_MAX).half().float()
    safe = torch.where(unit > 0, unit, torch.ones_like(unit))
    multipliers = torch.round(per_super / safe.unsqueeze(-1)).clamp(0, MAX_MULTIPLIER)
    multipliers = torch.where(unit.unsqueeze(-1) > 0, multipliers, torch.zeros_like(multipliers))
    return unit, multipliers.flatten(-2)


def quantize_offset(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Codes clamp(round((w + offset) / step), 0, 15) as floats (0 where step is 0); broadcasting
    as in grid.quantize_codes."""
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.clamp(torch.round((w + offset) / safe), 0, MAX_CODE)
    return torch.where(step > 0, codes, torch.zeros_like(codes))


def dequantize_offset(codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """codes * step - offset in fp32 (the same operations as QuantizedWeight.dequantize)."""
    return codes.float() * step.float() - offset.float()


def pack_kquant(codes: torch.Tensor, params: KQuantParams) -> QuantizedWeight:
    """Codes [..., N, K] (integer floats) on the offset grid `params` -> a Q4_K or Q4_1 offset-grid
    QuantizedWeight (contiguous, as grid.pack_quantized)."""
    return QuantizedWeight(codes.to(torch.uint8).contiguous(), params.sc.to(torch.uint8).contiguous(),
                           params.m.to(torch.uint8).contiguous(), 4, GROUP,
                           super_scales=params.d.half().contiguous(), super_mins=params.dmin.half().contiguous())


def rtn_quantize_k(W: torch.Tensor, grid_params: Callable[[torch.Tensor], KQuantParams] = kquant_params) -> QuantizedWeight:
    """Round-to-nearest of W [..., N, K] on its offset grid (default Q4_K: K a multiple of 256)."""
    params = grid_params(W)
    step, offset = params.column_steps()
    return pack_kquant(quantize_offset(W.float(), step, offset), params)
