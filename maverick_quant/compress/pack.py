"""Bit packing, and the GPTQ checkpoint layout (AutoGPTQ/GPTQModel v1, checkpoint_format "gptq").

A packed int32 word holds 32/bits codes along one dim; code j of the word sits in bits
[j*bits, (j+1)*bits) (first code in the lowest bits). Words are built in int64 and mapped to
int32 by two's complement, so a set top bit becomes a negative int32 without overflow.

GPTQ layout of a linear with N outputs, K inputs, G groups:
    qweight int32 [K*bits/32, N]   codes transposed to [K, N], packed along K
    qzeros  int32 [G, N*bits/32]   (zero - 1) mod 2^bits, packed along N (v1 convention)
    scales  fp16  [G, N]
    g_idx   int32 [K]              k // group_size (0 everywhere for group_size -1)

AWQ GEMM layout (AutoAWQ "gemm", 4 bits, K a multiple of the group size):
    qweight int32 [K, N/8]         codes packed along N, nibble i of a word holding output
                                   column AWQ_ORDER[i] of its block of 8
    qzeros  int32 [G, N/8]         the real zero points, packed the same way
    scales  fp16  [G, N]

compressed-tensors "pack-quantized" layout (bits 2/4/8, any group grid):
    weight_packed     int32 [N, K*bits/32]   codes packed along K (compressed-tensors stores the
                                             signed value q - 2^(bits-1) offset by +2^(bits-1),
                                             which is exactly our unsigned code)
    weight_scale      [N, G]                 in the model's float dtype (its dequantized weight
                                             takes the scale's dtype)
    weight_zero_point int32 [N*bits/32, G]   asymmetric only: zero points packed along N
    weight_shape      int64 [2]              [N, K]
A symmetric grid has zero 2^(bits-1), i.e. signed zero 0, and writes no zero point.
"""

from __future__ import annotations

import torch

from maverick_quant.compress.types import QuantizedWeight

PACK_BITS = (2, 4, 8)
_WORD = 1 << 32


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] codes < 16 with K even -> uint8 [..., K/2], code 2j in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 [..., K/2] -> [..., K]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _per_word(bits: int) -> int:
    """Codes per int32 word; only widths dividing 32 pack without straddling words."""
    if bits not in PACK_BITS:
        raise ValueError(f"bits={bits}: packing supports bits in {PACK_BITS} (32 must be a multiple of bits)")
    return 32 // bits


def _check_divisible(size: int, per: int, bits: int, what: str) -> None:
    if size % per:
        raise ValueError(f"{what} has size {size}, not a multiple of {per} ({per} codes of {bits} bits per int32)")


def pack_along(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) -> int32, `dim` shrunk by 32/bits: word i of a lane holds
    codes [i*per, (i+1)*per) of that lane, code j in bits [j*bits, (j+1)*bits)."""
    per = _per_word(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"pack_along: codes must be an integer tensor, got {codes.dtype}")
    _check_divisible(codes.shape[dim], per, bits, f"packed dim {dim} of shape {tuple(codes.shape)}")
    lanes = codes.movedim(dim, -1).to(torch.int64)
    if lanes.numel() and (lanes.min() < 0 or lanes.max() > (1 << bits) - 1):
        raise ValueError(f"pack_along: codes must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (lanes.unflatten(-1, (-1, per)) << shifts).sum(-1)  # in [0, 2^32): disjoint bit fields
    words = torch.where(words >= _WORD // 2, words - _WORD, words)  # two's complement into int32 range
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_along(packed: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    """Inverse of `pack_along`: int32 -> uint8 codes with `dim` of size `length` (= size * 32/bits)."""
    per = _per_word(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_along: packed must be int32, got {packed.dtype}")
    if length != packed.shape[dim] * per:
        raise ValueError(f"unpack_along: length {length} != {packed.shape[dim]} words x {per} codes of {bits} bits")
    words = packed.movedim(dim, -1).to(torch.int64) & (_WORD - 1)  # back to the unsigned bit pattern
    shifts = torch.arange(per, device=packed.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2).to(torch.uint8).movedim(-1, dim).contiguous()


def gptq_v1_zero_problem(zeros: torch.Tensor, bits: int) -> str | None:
    """Why GPTQ's v1 format cannot hold the zero points `zeros` (uint8, any shape), or None.

    v1 stores zero - 1, and its readers add the 1 back without wrapping (vLLM's exllama kernel:
    `zero_offset = 1`; GPTQModel's v1 -> v2 conversion adds 1 per packed nibble and carries into
    the next), so a zero point of 0 cannot be stored (an asymmetric grid gives it to a group with
    almost no negative range)."""
    zero_groups = int((zeros == 0).sum())
    if not zero_groups:
        return None
    return (f"zero point 0 in {zero_groups} of its {zeros.numel()} groups, which GPTQ's v1 format "
            f"(zero - 1 stored) cannot hold: its readers would take it as {1 << bits}. Export "
            "--format compressed-tensors or awq (zero points stored as they are), or quantize with --sym")


def to_gptq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A 2-D QuantizedWeight [N, K] -> {"qweight", "qzeros", "scales", "g_idx"} in the GPTQ v1 layout.

    A zero point of 0 cannot be stored (`gptq_v1_zero_problem`): ValueError."""
    if qw.codes.dim() != 2:
        raise ValueError(f"to_gptq_tensors: expected a 2-D weight [N, K], got shape {qw.shape}")
    problem = gptq_v1_zero_problem(qw.zeros, qw.bits)
    if problem:
        raise ValueError(problem)
    stored_zeros = qw.zeros.to(torch.int64) - 1  # v1 stores zero - 1
    return {
        "qweight": pack_along(qw.codes.t(), qw.bits, dim=0),
        "qzeros": pack_along(stored_zeros.t(), qw.bits, dim=1),
        "scales": qw.scales.t().contiguous(),
        "g_idx": qw.group_index(device=qw.codes.device),
    }


def from_gptq_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedWeight:
    """Inverse of `to_gptq_tensors` (g_idx is not read; callers may check it against group_index())."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    per = _per_word(bits)
    k, n = qweight.shape[0] * per, scales.shape[-1]
    _check_divisible(n, per, bits, "GPTQ output dim N (scales.shape[1])")
    width = k if group_size == -1 else group_size
    expected = {"qweight": (k // per, n), "qzeros": (-(-k // width), n // per), "scales": (-(-k // width), n)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"GPTQ {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"for K={k}, N={n}, bits={bits}, group_size={group_size}"
            )
    codes = unpack_along(qweight, bits, dim=0, length=k).t()
    zeros = unpack_along(qzeros, bits, dim=1, length=n).to(torch.int64) + 1  # as its readers do: no wrapping
    if (zeros > (1 << bits) - 1).any():
        raise ValueError(f"GPTQ qzeros store {int((zeros > (1 << bits) - 1).sum())} zero points of {1 << bits} (a stored "
                         f"{(1 << bits) - 1} + 1), outside the {bits}-bit grid: what a zero point of 0 written in the v1 "
                         "format becomes for vLLM and GPTQModel")
    return QuantizedWeight(
        codes=codes.contiguous(),
        scales=scales.t().contiguous(),
        zeros=zeros.to(torch.uint8).t().contiguous(),
        bits=bits,
        group_size=group_size,
    )


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column held by nibble i of an AWQ GEMM word


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, N] 4-bit codes -> int32 [R, N/8] in AWQ's interleaved nibble order."""
    rows, n = values.shape
    _check_divisible(n, 8, 4, "AWQ output dim N")
    order = torch.tensor(AWQ_ORDER, device=values.device)
    return pack_along(values.reshape(rows, n // 8, 8).index_select(-1, order).reshape(rows, n), 4, dim=1)


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `_awq_pack`: int32 [R, N/8] -> uint8 [R, N]."""
    rows, words = packed.shape
    nibbles = unpack_along(packed, 4, dim=1, length=words * 8).reshape(rows, words, 8)
    inverse = torch.argsort(torch.tensor(AWQ_ORDER, device=packed.device))
    return nibbles.index_select(-1, inverse).reshape(rows, words * 8)


def to_awq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A 2-D 4-bit QuantizedWeight [N, K] -> {"qweight", "qzeros", "scales"} (AWQ GEMM)."""
    n, k = qw.shape
    if qw.bits != 4 or qw.group_size == -1 or k % qw.group_size:
        raise ValueError(f"AWQ GEMM stores 4-bit weights with K a multiple of the group size; got bits={qw.bits}, "
                         f"group_size={qw.group_size}, K={k}")
    return {"qweight": _awq_pack(qw.codes.t()), "qzeros": _awq_pack(qw.zeros.t()), "scales": qw.scales.t().contiguous()}


def from_awq_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedWeight:
    """Inverse of `to_awq_tensors`."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    k, n = qweight.shape[0], scales.shape[-1]
    expected = {"qweight": (k, n // 8), "qzeros": (k // group_size, n // 8), "scales": (k // group_size, n)}
    for name, shape in expected.items():
        if bits != 4 or tuple(tensors[name].shape) != shape:
            raise ValueError(f"AWQ {name} has shape {tuple(tensors[name].shape)}, expected {shape} for K={k}, N={n}, "
                             f"bits=4 (got {bits}), group_size={group_size}")
    return QuantizedWeight(_awq_unpack(qweight).t().contiguous(), scales.t().contiguous(),
                           _awq_unpack(qzeros).t().contiguous(), bits, group_size)


def to_compressed_tensors(qw: QuantizedWeight, symmetric: bool, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A 2-D QuantizedWeight [N, K] -> compressed-tensors pack-quantized tensors (see module doc);
    `symmetric` (the bundle's grid) decides whether zero points are written. compressed-tensors
    dequantizes groups only when they tile K, so K must be a multiple of the group size."""
    k = qw.shape[-1]
    if qw.group_size != -1 and k % qw.group_size:
        raise ValueError(f"compressed-tensors needs K a multiple of the group size; K={k}, group_size={qw.group_size}")
    tensors = {"weight_packed": pack_along(qw.codes, qw.bits, dim=-1),
               "weight_scale": qw.scales.to(scale_dtype).contiguous(),
               "weight_shape": torch.tensor(qw.shape, dtype=torch.int64)}
    if symmetric and not bool((qw.zeros == 1 << (qw.bits - 1)).all()):
        raise ValueError(f"a symmetric grid has zero points {1 << (qw.bits - 1)}; this weight has others")
    if not symmetric:
        tensors["weight_zero_point"] = pack_along(qw.zeros, qw.bits, dim=0)
    return tensors


def from_compressed_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedWeight:
    """Inverse of `to_compressed_tensors` (zero points 2^(bits-1) when none are stored)."""
    n, k = (int(size) for size in tensors["weight_shape"])
    codes = unpack_along(tensors["weight_packed"], bits, -1, k)
    scales = tensors["weight_scale"]
    groups = 1 if group_size == -1 else -(-k // group_size)
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"weight_scale has shape {tuple(scales.shape)}, expected {(n, groups)} for N={n}, K={k}, "
                         f"group_size={group_size}")
    if "weight_zero_point" in tensors:
        zeros = unpack_along(tensors["weight_zero_point"], bits, 0, n)
    else:
        zeros = torch.full((n, groups), 1 << (bits - 1), dtype=torch.uint8)
    return QuantizedWeight(codes, scales, zeros, bits, group_size)
