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
(one scale per row), and K is a multiple of 32.
    Q4_K  144 bytes per 256 values: d fp16, dmin fp16, 12 bytes of 6-bit (sc, m) for the 8
          groups, 128 bytes of codes;  value = q * d * sc - dmin * m.
A weight on our K-quant grid (compress/kquant.py) is Q4_K with its own (d, dmin, sc, m, q).
A weight on Q4_1's own offset grid (free fp16 d and m, compress/kquant.py) is Q4_1 with
d = d, m = -dmin, q = code.
Q4_K needs K a multiple of 256: a Q4_K export stores the other matrices as Q4_1, the grid a
k_quant spec gives them (llama.cpp's own quantizer falls back to Q5_0 there).
Such an encoding is lossless: gguf-py's `gguf.quants.dequantize` gives the bundle's
dequantized values bit for bit (gguf-py cannot quantize Q4_K; the packer here is ours).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maverick_quant.compress.kquant import uses_k_grid
from maverick_quant.compress.types import SUPER_BLOCK, QuantizedWeight

BLOCK = 32
Q4_1_SCALE_BITS = 7  # 7-bit scale x 4-bit zero fits fp16's 11-bit significand


@dataclass(frozen=True)
class BlockType:
    """A llama.cpp block type: name (gguf.GGMLQuantizationType member), the grid it stores,
    bytes per block of `block` columns."""

    name: str
    bits: int
    sym: bool
    bytes_per_block: int
    block: int = BLOCK
    k_quant: bool = False

    def row_bytes(self, in_features: int) -> int:
        return in_features // self.block * self.bytes_per_block


BLOCK_TYPES = {t.name: t for t in (BlockType("Q4_0", 4, True, 18), BlockType("Q4_1", 4, False, 20),
                                   BlockType("Q8_0", 8, True, 34),
                                   BlockType("Q4_K", 4, False, 144, block=SUPER_BLOCK, k_quant=True))}


def tensor_block_type(block_type: BlockType, in_features: int) -> BlockType:
    """The type a matrix with `in_features` columns gets in a `block_type` export: Q4_1 for a
    Q4_K export whose K is not a multiple of 256 (the grid a k_quant spec gives it), else `block_type`."""
    if block_type.k_quant and not uses_k_grid(True, in_features):
        return BLOCK_TYPES["Q4_1"]
    return block_type


def block_type_for_grid(quant: dict) -> BlockType:
    """The llama.cpp type that stores a grid {bits, sym, ...} of one tensor of another width
    than the export's (a bits override): Q8_0 for 8 bits, Q4_0 / Q4_1 for 4 (sym / asym).
    ValueError for widths no type here stores."""
    if quant["bits"] == 8:
        return BLOCK_TYPES["Q8_0"]
    if quant["bits"] == 4:
        return BLOCK_TYPES["Q4_0" if quant["sym"] else "Q4_1"]
    raise ValueError(f"a {quant['bits']}-bit tensor has no GGUF type here (Q4_0, Q4_1, Q4_K: 4 bits; Q8_0: 8 bits)")


def grid_mismatch(quant: dict, block_type: BlockType) -> str | None:
    """Why a bundle grid {bits, group_size, sym, scale_bits, k_quant, free_min} cannot be stored
    losslessly in `block_type`, or None."""
    group = quant["group_size"]
    if bool(quant.get("k_quant")) != block_type.k_quant:
        return (f"{block_type.name} {'stores' if block_type.k_quant else 'does not store'} llama.cpp's K-quant "
                f"super-block grid; the bundle {'is' if quant.get('k_quant') else 'is not'} on it (--gguf-grid Q4_K)")
    if block_type.k_quant:
        return None
    if quant.get("free_min"):
        return None if block_type.name == "Q4_1" else (
            f"{block_type.name} does not store Q4_1's own grid (a free fp16 minimum per group); the bundle is on it "
            "(--gguf-grid Q4_1): export it as Q4_1")
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
    """Codes of `weight` [..., N, K] as llama.cpp blocks: uint8 [..., N, K/block * bytes_per_block].
    Raises ValueError when the weight is not on the block type's grid."""
    if block_type.k_quant:
        return encode_q4_k(weight)
    k = weight.shape[-1]
    if k % BLOCK:
        raise ValueError(f"{block_type.name} needs K a multiple of {BLOCK}; K={k}")
    header = _offset_q4_1_header(weight, block_type) if weight.offset_grid else _uniform_header(weight, block_type)
    codes = weight.codes.unflatten(-1, (-1, BLOCK))  # [..., N, B, 32]
    if block_type.bits == 4:
        payload = (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)
    else:
        payload = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
    parts = [h.unsqueeze(-1).view(torch.uint8) for h in header] + [payload]
    return torch.cat(parts, dim=-1).flatten(-2).contiguous().numpy()


def _uniform_header(weight: QuantizedWeight, block_type: BlockType) -> list[torch.Tensor]:
    """fp16 block headers [..., N, K/32] of a (code - zero) x scale weight: [d] (Q4_0, Q8_0) or
    [d, m = -zero x scale] (Q4_1). Raises ValueError when the grid does not fit the type."""
    symmetric = bool((weight.zeros == 1 << (weight.bits - 1)).all())
    grid = {"bits": weight.bits, "group_size": weight.group_size, "sym": symmetric and block_type.sym,
            "scale_bits": Q4_1_SCALE_BITS}  # the Q4_1 scale condition is checked on the values below
    mismatch = grid_mismatch(grid, block_type)
    if mismatch:
        raise ValueError(mismatch)
    blocks = _group_of_block(weight)
    header = [weight.scales.to(torch.float16).index_select(-1, blocks)]
    if block_type.name == "Q4_1":
        zeros = weight.zeros.index_select(-1, blocks)
        m = (-zeros.float() * weight.scales.float().index_select(-1, blocks))
        if not torch.equal(m.to(torch.float16).float(), m):
            raise ValueError("Q4_1 needs -zero * scale to be an fp16 number for every group; this weight's are not")
        header.append(m.to(torch.float16))
    return header


def _offset_q4_1_header(weight: QuantizedWeight, block_type: BlockType) -> list[torch.Tensor]:
    """[d, m = -dmin] fp16 [..., N, K/32] of a weight on Q4_1's own grid (unit multipliers)."""
    if weight.gguf_grid != "Q4_1" or block_type.name != "Q4_1":
        weight.require_uniform(block_type.name)
    if not (bool((weight.scales == 1).all()) and bool((weight.zeros == 1).all())):
        raise ValueError("Q4_1 blocks hold one (d, m) per 32 columns; this offset-grid weight has group multipliers "
                         "other than 1")
    return [weight.super_scales.half(), (-weight.super_mins.float()).half()]


def encode_q4_k(weight: QuantizedWeight) -> np.ndarray:
    """A K-quant weight [..., N, K] as Q4_K blocks uint8 [..., N, K/256 * 144]: per super-block
    d, dmin (fp16), 12 scale bytes, then 128 bytes where byte 32i + l holds the codes of
    columns 64i + l (low nibble) and 64i + 32 + l (high nibble). The 12 scale bytes hold the
    6-bit sc[j], m[j] of the 8 groups: bytes 0-3 sc[0..3] | (sc[4..7] >> 4) << 6, bytes 4-7 the
    same for m, bytes 8-11 (sc[4..7] & 15) | (m[4..7] & 15) << 4 (ggml's get_scale_min_k4)."""
    if not weight.k_quant:
        raise ValueError("Q4_K stores llama.cpp's K-quant super-block grid; this weight is not on it "
                         "(quantize with --gguf-grid Q4_K)")
    sc = weight.scales.to(torch.uint8).unflatten(-1, (-1, 8))  # [..., N, S, 8]
    m = weight.zeros.to(torch.uint8).unflatten(-1, (-1, 8))
    low, high = sc[..., :4], sc[..., 4:]
    m_low, m_high = m[..., :4], m[..., 4:]
    scale_bytes = torch.cat([low | ((high >> 4) << 6), m_low | ((m_high >> 4) << 6), (high & 15) | ((m_high & 15) << 4)], -1)
    codes = weight.codes.to(torch.uint8).unflatten(-1, (-1, 4, 2, 32))  # [..., N, S, 4 pairs, 2 groups, 32]
    payload = (codes[..., 0, :] | (codes[..., 1, :] << 4)).flatten(-2)  # [..., N, S, 128]
    header = [t.half().unsqueeze(-1).view(torch.uint8) for t in (weight.super_scales, weight.super_mins)]
    return torch.cat([*header, scale_bytes, payload], dim=-1).flatten(-2).contiguous().numpy()


def relative_error(stored: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative Frobenius error ||stored - reference|| / ||reference|| in fp64 (a re-quantized
    tensor against its source, llama.cpp's image embeddings against the reference's)."""
    return float((stored.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))
