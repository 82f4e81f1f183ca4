"""The quantized-weight value type shared by solvers, the bundle and the exporters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPER_BLOCK = 256  # columns per llama.cpp K-quant super-block (QK_K)


def group_index(in_features: int, group_size: int, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """g_idx [K]: k // group_size (all 0 for group_size -1), on `device`."""
    width = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=dtype, device=device) // width


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight `W[..., N, K]` (N outputs, K inputs) stored as integer codes on a group grid.

    codes:  uint8  [..., N, K]   integer codes in [0, 2^bits - 1], original column order.
    scales: fp16   [..., N, G]   G = ceil(K / group_size) (1 when group_size = -1).
    zeros:  uint8  [..., N, G]   integer zero points (2^(bits-1) when symmetric).
    bits, group_size: the grid (group_size -1 = per row).

    Dequantization: W_hat[..., n, k] = (codes[..., n, k] - zeros[..., n, g(k)]) * scales[..., n, g(k)]
    with g(k) = k // group_size (always trivial: act-order uses static groups).

    Offset grids (llama.cpp's own), when `super_scales` is set: groups of 32 columns form
    super-blocks of B columns (s(k) = k // B), and the per-group tensors are integer multipliers:
    super_scales: fp16 [..., N, K/B] d,  super_mins: fp16 [..., N, K/B] dmin,
    scales: uint8 [..., N, K/32] sc,     zeros: uint8 [..., N, K/32] m,
        W_hat[..., n, k] = codes * (d[s(k)] * sc[g(k)]) - dmin[s(k)] * m[g(k)]      (fp32)
    in llama.cpp's own operation order: both products are exact in fp32 (11 x 6 bits), only
    the subtraction rounds, so gguf-py's dequantization of the packed blocks agrees bit for bit.
      Q4_K: B = 256, sc and m 6-bit (0..63), dmin >= 0.
      Q4_1: B = 32 (one group per super-block), sc = m = 1: W_hat = code * d - dmin, which is
            Q4_1's `q * d + m` with m = -dmin (any fp16 number: the group's minimum, whatever its sign).
    B is read from the shapes: K / super_scales.shape[-1].
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    super_scales: torch.Tensor | None = None
    super_mins: torch.Tensor | None = None

    @property
    def offset_grid(self) -> bool:
        """Whether the weight is on one of llama.cpp's offset grids, Q4_K or Q4_1 (see the class docstring)."""
        return self.super_scales is not None

    @property
    def super_block(self) -> int | None:
        """Columns per super-block of an offset grid (256: Q4_K, 32: Q4_1), None otherwise."""
        return self.codes.shape[-1] // self.super_scales.shape[-1] if self.offset_grid else None

    @property
    def k_quant(self) -> bool:
        """Whether the weight is on llama.cpp's K-quant super-block grid (Q4_K)."""
        return self.super_block == SUPER_BLOCK

    @property
    def gguf_grid(self) -> str | None:
        """The llama.cpp type whose own grid this weight is on ("Q4_K", "Q4_1"), None for a (code - zero) x scale grid."""
        return None if not self.offset_grid else "Q4_K" if self.k_quant else "Q4_1"

    def map_tensors(self, fn) -> "QuantizedWeight":
        """The same weight with `fn` applied to each tensor (indexing, reshaping leading dims)."""
        supers = (fn(self.super_scales), fn(self.super_mins)) if self.offset_grid else (None, None)
        return QuantizedWeight(fn(self.codes), fn(self.scales), fn(self.zeros), self.bits, self.group_size, *supers)

    def require_uniform(self, purpose: str) -> "QuantizedWeight":
        """self, or ValueError naming `purpose` when the weight is on an offset grid, which only a
        GGUF tensor of that type stores."""
        if self.offset_grid:
            grid = self.gguf_grid
            raise ValueError(f"{purpose} stores (code - zero) x scale grids; this weight is on llama.cpp's {grid} "
                             f"grid (free fp16 offsets), which only GGUF {grid} stores (export --format gguf --gguf-type {grid})")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def __getitem__(self, index) -> "QuantizedWeight":
        """Index the leading (batch) dimensions: experts[e] is expert e's [N, K] weight."""
        return self.map_tensors(lambda t: t[index])

    def merge_leading(self) -> "QuantizedWeight":
        """[A, B, ..., K] -> [A*B, ..., K]: e.g. per-KV-head solves [kv, hd, K] back to [kv*hd, K]."""
        return self.map_tensors(lambda t: t.flatten(0, 1))

    def group_index(self, dtype: torch.dtype = torch.int32, device: torch.device | str = "cpu") -> torch.Tensor:
        """g_idx: [K] (int32 on the host unless asked), the group of each input column."""
        return group_index(self.codes.shape[-1], self.group_size, device, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat [..., N, K] in `dtype`, computed in fp32 then cast, on the codes' device."""
        g_idx = self.group_index(torch.int64, self.codes.device)
        if self.offset_grid:
            return self._dequantize_offset(g_idx).to(dtype)
        scales = self.scales.float().index_select(-1, g_idx)
        zeros = self.zeros.float().index_select(-1, g_idx)
        return ((self.codes.float() - zeros) * scales).to(dtype)

    def _dequantize_offset(self, g_idx: torch.Tensor) -> torch.Tensor:
        """Offset-grid W_hat [..., N, K] fp32: codes * (d * sc) - dmin * m, per column."""
        s_idx = torch.arange(self.codes.shape[-1], device=self.codes.device) // self.super_block
        step = self.super_scales.float().index_select(-1, s_idx) * self.scales.float().index_select(-1, g_idx)
        offset = self.super_mins.float().index_select(-1, s_idx) * self.zeros.float().index_select(-1, g_idx)
        return self.codes.float() * step - offset


def concat_leading(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights [E_i, N, K] (same grid) concatenated along dim 0 -> [sum E_i, N, K]."""
    first = weights[0]
    fields = [torch.cat([getattr(w, f) for w in weights]) for f in ("codes", "scales", "zeros")]
    supers = ([torch.cat([getattr(w, f) for w in weights]) for f in ("super_scales", "super_mins")]
              if first.offset_grid else [None, None])
    return QuantizedWeight(*fields, first.bits, first.group_size, *supers)
