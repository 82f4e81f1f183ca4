"""The runtime layout every 4-bit kernel reads, and converters to and from it.

    packed  uint8  [E?, N, K/2]  codes, K-contiguous: byte j of a row holds code 2j in its
                                 low nibble and code 2j+1 in its high nibble (the bundle's
                                 on-disk form: routed experts load as stored, unpacked never)
    scales  fp16   [E?, N, G]    G = K / group_size
    zeros   uint8  [E?, N, G]    integer zero points; None when symmetric (zero 8 everywhere)

    W[n, k] = (code[n, k] - zero[n, k // group_size]) * scale[n, k // group_size]

Why this layout: a GEMV reads each output row's K/2 bytes contiguously (coalesced on a GPU,
streaming on a CPU), its group's scale once per `group_size` codes, and experts stack on a
leading dimension so one launch can index any expert by `expert * N * K/2`. The packed form
that `torch.ops.aten._weight_int4pack_mm_for_cpu` wants depends on the CPU's instruction set,
so it is built at load time from this layout and never persisted.

Converters: `Int4Weight.from_quantized` (bundle -> runtime), `to_quantized` (runtime ->
bundle value), and `to_export_tensors` (runtime -> the GPTQ, AWQ and compressed-tensors
tensor layouts, via the exporters' own packers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maverick_quant.compress.pack import pack_nibbles, unpack_nibbles
from maverick_quant.compress.types import QuantizedWeight

SYMMETRIC_ZERO = 8
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Int4Weight:
    """A 4-bit weight in the runtime layout (see the module docstring for shapes)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[-2]

    @property
    def in_features(self) -> int:
        return self.packed.shape[-1] * 2

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def num_experts(self) -> int | None:
        """E for a stacked expert weight [E, N, K/2]; None for a dense [N, K/2] weight."""
        return self.packed.shape[0] if self.packed.dim() == 3 else None

    def nbytes(self) -> int:
        """Bytes a kernel reads for the whole weight (codes + scales + zeros)."""
        extra = 0 if self.zeros is None else self.zeros.numel()
        return self.packed.numel() + self.scales.numel() * self.scales.element_size() + extra

    def to(self, device: torch.device | str) -> "Int4Weight":
        zeros = None if self.zeros is None else self.zeros.to(device)
        return Int4Weight(self.packed.to(device), self.scales.to(device), zeros, self.group_size)

    def __getitem__(self, expert: int) -> "Int4Weight":
        """Expert `expert` of a stacked weight, [N, K/2]."""
        zeros = None if self.zeros is None else self.zeros[expert]
        return Int4Weight(self.packed[expert], self.scales[expert], zeros, self.group_size)

    @staticmethod
    def from_quantized(weight: QuantizedWeight, name: str = "weight") -> "Int4Weight":
        """Bundle value -> runtime layout. Raises ValueError (naming `name`) for what the kernels cannot run."""
        _check_kernel_grid(weight, name)
        packed = pack_nibbles(weight.codes).contiguous()
        symmetric = bool((weight.zeros == SYMMETRIC_ZERO).all())
        zeros = None if symmetric else weight.zeros.contiguous()
        return Int4Weight(packed, weight.scales.half().contiguous(), zeros, weight.group_size)

    def codes(self) -> torch.Tensor:
        """uint8 [E?, N, K] unpacked codes."""
        return unpack_nibbles(self.packed)

    def zero_points(self) -> torch.Tensor:
        """uint8 [E?, N, G], 8 everywhere for a symmetric weight."""
        if self.zeros is not None:
            return self.zeros
        return torch.full(self.scales.shape, SYMMETRIC_ZERO, dtype=torch.uint8, device=self.scales.device)

    def to_quantized(self) -> QuantizedWeight:
        """Runtime layout -> the bundle's QuantizedWeight (exactly the values it came from)."""
        return QuantizedWeight(self.codes(), self.scales, self.zero_points(), 4, self.group_size)


def _check_kernel_grid(weight: QuantizedWeight, name: str) -> None:
    weight.require_uniform(f"{name}: the 4-bit kernel layout")
    check_kernel_grid(weight.bits, weight.group_size, weight.codes.shape[-1], name)


def check_kernel_grid(bits: int, group_size: int, in_features: int, name: str, offset_grid: str | None = None) -> None:
    """ValueError naming `name` unless the kernels run this grid: 4 bits, a supported group
    size that divides K = `in_features`, not one of llama.cpp's offset grids (`offset_grid`:
    "Q4_K" / "Q4_1", whose free fp16 offsets only GGUF stores)."""
    if offset_grid is not None:
        raise ValueError(f"{name}: the 4-bit kernel layout stores (code - zero) x scale grids; this weight is on "
                         f"llama.cpp's {offset_grid} grid (free fp16 offsets), which only GGUF {offset_grid} stores")
    if bits != 4:
        raise ValueError(f"{name}: the 4-bit kernels cannot run a {bits}-bit weight")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{name}: group size {group_size} is not one the kernels support {GROUP_SIZES}")
    if in_features % group_size:
        raise ValueError(f"{name}: K={in_features} is not a multiple of the group size {group_size}")


def concat_outputs(weights: list[Int4Weight]) -> Int4Weight:
    """Weights that share their input, concatenated along N (e.g. gate and up -> gate_up
    [..., 2I, K/2], so one GEMV reads the input once for both)."""
    zeros = None
    if any(w.zeros is not None for w in weights):
        zeros = torch.cat([w.zero_points() for w in weights], dim=-2)
    return Int4Weight(torch.cat([w.packed for w in weights], dim=-2), torch.cat([w.scales for w in weights], dim=-2),
                      zeros, weights[0].group_size)


def to_export_tensors(weight: Int4Weight, layout: str, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Runtime layout -> one export layout's tensors ("gptq", "awq", "compressed-tensors"),
    through the same packers the exporters use (dense [N, K/2] weights only)."""
    from maverick_quant.compress import pack

    quantized = weight.to_quantized()
    if layout == "gptq":
        return pack.to_gptq_tensors(quantized)
    if layout == "awq":
        return pack.to_awq_tensors(quantized)
    if layout == "compressed-tensors":
        return pack.to_compressed_tensors(quantized, weight.symmetric, dtype)
    raise ValueError(f"layout {layout!r}: expected gptq, awq or compressed-tensors")
