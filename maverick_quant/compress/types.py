"""The quantized-weight value type shared by solvers, the bundle and the exporters."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight `W[..., N, K]` (N outputs, K inputs) stored as integer codes on a group grid.

    codes:  uint8  [..., N, K]   integer codes in [0, 2^bits - 1], original column order.
    scales: fp16   [..., N, G]   G = ceil(K / group_size) (1 when group_size = -1).
    zeros:  uint8  [..., N, G]   integer zero points (2^(bits-1) when symmetric).
    bits, group_size: the grid (group_size -1 = per row).

    Dequantization: W_hat[..., n, k] = (codes[..., n, k] - zeros[..., n, g(k)]) * scales[..., n, g(k)]
    with g(k) = k // group_size (always trivial: act-order uses static groups).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def __getitem__(self, index) -> "QuantizedWeight":
        """Index the leading (batch) dimensions: experts[e] is expert e's [N, K] weight."""
        return QuantizedWeight(self.codes[index], self.scales[index], self.zeros[index], self.bits, self.group_size)

    def merge_leading(self) -> "QuantizedWeight":
        """[A, B, ..., K] -> [A*B, ..., K]: e.g. per-KV-head solves [kv, hd, K] back to [kv*hd, K]."""
        return QuantizedWeight(self.codes.flatten(0, 1), self.scales.flatten(0, 1), self.zeros.flatten(0, 1),
                               self.bits, self.group_size)

    def group_index(self) -> torch.Tensor:
        """g_idx: int32 [K], the group of each input column."""
        k = self.codes.shape[-1]
        width = k if self.group_size == -1 else self.group_size
        return torch.arange(k, dtype=torch.int32) // width

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat [..., N, K] in `dtype`, computed in fp32 then cast."""
        g_idx = self.group_index().long().to(self.codes.device)
        scales = self.scales.float().index_select(-1, g_idx)
        zeros = self.zeros.float().index_select(-1, g_idx)
        return ((self.codes.float() - zeros) * scales).to(dtype)
