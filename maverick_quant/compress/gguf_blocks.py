"""QuantizedWeight <-> llama.cpp block encodings (pure tensor functions, no file format).

A GGUF quantized row of K values is K/32 blocks of 32 values (block b = columns [32b, 32b+32)):
    Q4_0  18 bytes: d fp16, then 16 bytes; byte j = q[j] | q[j+16] << 4;   value = (q - 8) * d
    Q4_1  20 bytes: d fp16, m fp16, then the same 16 bytes;                value = q * d + m
    Q8_0  34 bytes: d fp16, then 32 int8 q;                                value = q * d
Our grid is value = (code - zero) * scale with one fp16 scale and integer zero per group:
  - a symmetric 4-bit grid (zero 8) is Q4_0 with d = scale, q = code;
  - a symmetric 8-bit grid (zero 128) is Q8_0 with d = scale, q = code - 128;
  - an asymmetric 4-bit grid is Q4_1 with d = scale, m = -zero * scale, q = code, exactly
    when -zero * scale is an fp16 number (checked; otherwise the weight is not on the grid);
whenever the group size is a multiple of 32 (a group's scale repeats over its blocks) or -1
(one scale per row), and K is a multiple of 32. Such an encoding is lossless: gguf-py's
`gguf.quants.dequantize` gives the bundle's dequantized values bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maverick_quant.compress.types import QuantizedWeight

BLOCK = 32
Q4_1_SCALE_BITS = 7  # 7-bit scale x 4-bit zero fits fp16's 11-bit significand


@dataclass(frozen=True)
class BlockType:
    """A llama.cpp block type: name (gguf.GGMLQuantizationType member), the grid it stores."""

    name: str
    bits: int
    sym: bool
    bytes_per_block: int


BLOCK_TYPES = {t.name: t for t in (BlockType("Q4_0", 4, True, 18), BlockType("Q4_1", 4, False, 20),
                                   BlockType("Q8_0", 8, True, 34))}


def grid_mismatch(quant: dict, block_type: BlockType) -> str | None:
    """Why a bundle grid {bits, group_size, sym} cannot be stored losslessly in `block_type`, or None."""
    group = quant["group_size"]
    if quant["bits"] != block_type.bits or quant["sym"] != block_type.sym:
        grid = f"{block_type.bits}-bit {'symmetric' if block_type.sym else 'asymmetric'}"
        return (f"{block_type.name} stores a {grid} grid; the bundle is {quant['bits']}-bit "
                f"{'symmetric' if quant['sym'] else 'asymmetric'}")
    if group != -1 and group % BLOCK:
        return f"{block_type.name} blocks hold 32 columns; the bundle's group size {group} is not a multiple of 32"
    if not block_type.sym and quant.get("scale_bits", 11) > Q4_1_SCALE_BITS:
        return (f"{block_type.name} stores m = -zero x scale as fp16, which needs scales of at most {Q4_1_SCALE_BITS} "
                f"significant bits; the bundle's have {quant.get('scale_bits', 11)}")
    return None


def _group_of_block(weight: QuantizedWeight) -> torch.Tensor:
    """The group [K/32] of each 32-column block (a group's scale and zero repeat over its blocks)."""
    k = weight.shape[-1]
    width = k if weight.group_size == -1 else weight.group_size
    return torch.arange(0, k, BLOCK) // width


def encode_blocks(weight: QuantizedWeight, block_type: BlockType) -> np.ndarray:
    """Codes of `weight` [..., N, K] as llama.cpp blocks: uint8 [..., N, K/32 * bytes_per_block].
    Raises ValueError when the weight is not on the block type's grid."""
    k = weight.shape[-1]
    if k % BLOCK:
        raise ValueError(f"{block_type.name} needs K a multiple of {BLOCK}; K={k}")
    symmetric = bool((weight.zeros == 1 << (weight.bits - 1)).all())
    grid = {"bits": weight.bits, "group_size": weight.group_size, "sym": symmetric and block_type.sym,
            "scale_bits": Q4_1_SCALE_BITS}  # the Q4_1 scale condition is checked on the values below
    mismatch = grid_mismatch(grid, block_type)
    if mismatch:
        raise ValueError(mismatch)
    blocks = _group_of_block(weight)
    d = weight.scales.to(torch.float16).index_select(-1, blocks)  # [..., N, B]
    codes = weight.codes.unflatten(-1, (-1, BLOCK))  # [..., N, B, 32]
    header = [d]
    if block_type.name == "Q4_1":
        zeros = weight.zeros.index_select(-1, blocks)
        m = (-zeros.float() * weight.scales.float().index_select(-1, blocks))
        if not torch.equal(m.to(torch.float16).float(), m):
            raise ValueError("Q4_1 needs -zero * scale to be an fp16 number for every group; this weight's are not")
        header.append(m.to(torch.float16))
    if block_type.bits == 4:
        payload = (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)
    else:
        payload = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
    parts = [h.unsqueeze(-1).view(torch.uint8) for h in header] + [payload]
    return torch.cat(parts, dim=-1).flatten(-2).contiguous().numpy()


def requantize_error(reference: torch.Tensor, stored: torch.Tensor) -> float:
    """Relative Frobenius error ||stored - reference|| / ||reference|| of a re-quantized tensor."""
    return float((stored.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))
