"""Bit packing and the GPTQ v1 tensor layout: bit-exact both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maverick_quant.compress.gptq import gptq_quantize
from maverick_quant.compress.grid import rtn_quantize
from maverick_quant.compress.pack import from_gptq_tensors, pack_along, to_gptq_tensors, unpack_along
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.recipe import QuantSpec


def _codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    """Random codes with the extremes 0 and 2^bits - 1 (top bit set) forced in."""
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    codes.view(-1)[:8] = 2**bits - 1
    codes.view(-1)[-4:] = 0
    return codes


def _reference_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ-style packing of rows: word i |= code[i*per + j] << (bits * j), in uint32, viewed as int32."""
    per = 32 // bits
    out = np.zeros((codes.shape[0] // per, codes.shape[1]), dtype=np.uint32)
    for i in range(out.shape[0]):
        for j in range(per):
            out[i] |= codes[i * per + j].astype(np.uint32) << np.uint32(bits * j)
    return out.view(np.int32)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_pack_unpack_round_trip(bits, dim):
    codes = _codes((64, 48), bits, seed=bits)
    packed = pack_along(codes, bits, dim)
    per = 32 // bits
    expected = list(codes.shape)
    expected[dim] //= per
    assert packed.dtype == torch.int32 and list(packed.shape) == expected
    unpacked = unpack_along(packed, bits, dim, codes.shape[dim])
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked, codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_matches_reference_layout(bits):
    codes = _codes((96, 16), bits, seed=10 + bits)
    assert np.array_equal(pack_along(codes, bits, 0).numpy(), _reference_pack(codes.numpy(), bits))
    assert np.array_equal(pack_along(codes.t(), bits, 1).t().numpy(), _reference_pack(codes.numpy(), bits))


def test_pack_known_words_and_sign_bit():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [15] * 8, [0] * 7 + [8]], dtype=torch.uint8)
    words = pack_along(codes, 4, dim=1).flatten().tolist()
    assert words == [0x87654321 - 2**32, -1, -(2**31)]
    assert pack_along(torch.tensor([3] * 16), 2, 0).item() == -1
    assert pack_along(torch.tensor([0, 0, 0, 255]), 8, 0).item() == -(2**24)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits=3"):
        pack_along(torch.zeros(32, dtype=torch.uint8), 3, 0)
    with pytest.raises(ValueError, match="bits=3"):
        unpack_along(torch.zeros(4, dtype=torch.int32), 3, 0, 40)
    with pytest.raises(ValueError, match="size 12"):
        pack_along(torch.zeros(12, dtype=torch.uint8), 4, 0)
    with pytest.raises(ValueError, match="0, 15"):
        pack_along(torch.full((8,), 16), 4, 0)
    with pytest.raises(ValueError, match="integer"):
        pack_along(torch.zeros(8), 4, 0)


def _random_weight(bits: int, group_size: int, sym: bool, n: int = 32, k: int = 192, lowest_zero: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    groups = 1 if group_size == -1 else -(-k // group_size)
    if sym:
        zeros = torch.full((n, groups), 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(lowest_zero, 2**bits, (n, groups), generator=gen, dtype=torch.uint8)
        zeros[0, 0], zeros[-1, -1] = lowest_zero, 2**bits - 1  # the grid's ends
    scales = (torch.rand(n, groups, generator=gen) * 0.01 + 1e-4).half()
    return QuantizedWeight(_codes((n, k), bits, seed=bits), scales, zeros, bits, group_size)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_tensors_round_trip(bits, group_size, sym):
    qw = _random_weight(bits, group_size, sym, lowest_zero=1)  # v1 holds zero points 1 .. 2^bits - 1
    n, k = qw.shape
    groups = qw.scales.shape[1]
    tensors = to_gptq_tensors(qw)
    assert tensors["qweight"].dtype == torch.int32 and tensors["qweight"].shape == (k * bits // 32, n)
    assert tensors["qzeros"].dtype == torch.int32 and tensors["qzeros"].shape == (groups, n * bits // 32)
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (groups, n)
    assert tensors["g_idx"].dtype == torch.int32 and tensors["g_idx"].shape == (k,)
    width = k if group_size == -1 else group_size
    assert torch.equal(tensors["g_idx"], torch.arange(k, dtype=torch.int32) // width)
    assert all(t.is_contiguous() for t in tensors.values())
    stored = unpack_along(tensors["qzeros"], bits, 1, n).t().long()
    assert torch.equal(stored, qw.zeros.long() - 1)  # v1 convention
    back = from_gptq_tensors(tensors, bits, group_size)
    for name in ("codes", "scales", "zeros"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("sym", [True, False])
def test_solver_outputs_export_exactly(sym):
    gen = torch.Generator().manual_seed(5)
    W, X = torch.randn(64, 576, generator=gen) * 0.02, torch.randn(300, 576, generator=gen)
    spec = QuantSpec(bits=4, group_size=128, sym=sym, act_order=True)  # 576 = 4 * 128 + 64
    for qw in (rtn_quantize(W, spec), gptq_quantize(W, X.T @ X / 300, spec).weight):
        back = from_gptq_tensors(to_gptq_tensors(qw), 4, 128)
        assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_zero_point_gptq_v1_cannot_hold_is_refused_both_ways(bits):
    """v1 stores zero - 1 and its readers add 1 without wrapping: zero 0 is refused when writing,
    and a stored 2^bits - 1 (what another tool's wrapped zero 0 reads as: 2^bits) when reading,
    where our reader used to wrap it back to 0 and call the checkpoint exact."""
    with pytest.raises(ValueError, match=f"zero point 0 in \\d+ of its .* would take it as {2 ** bits}"):
        to_gptq_tensors(_random_weight(bits, 32, sym=False, lowest_zero=0))
    tensors = to_gptq_tensors(_random_weight(bits, 32, sym=False, lowest_zero=1))
    tensors["qzeros"][0, 0] |= (2**bits - 1)  # the first group's first zero stored as 2^bits - 1
    with pytest.raises(ValueError, match=f"zero points of {2 ** bits}"):
        from_gptq_tensors(tensors, bits, 32)


def test_from_gptq_tensors_checks_shapes():
    tensors = to_gptq_tensors(_random_weight(4, 32, sym=False, lowest_zero=1))
    with pytest.raises(ValueError, match="group_size=64"):
        from_gptq_tensors(tensors, 4, 64)
    with pytest.raises(ValueError, match="bits"):
        from_gptq_tensors(tensors, 3, 32)
    with pytest.raises(ValueError, match="2-D"):
        to_gptq_tensors(QuantizedWeight(torch.zeros(2, 8, 32, dtype=torch.uint8), torch.ones(2, 8, 1).half(),
                                        torch.zeros(2, 8, 1, dtype=torch.uint8), 4, -1))


def test_awq_gemm_layout_round_trips_and_uses_the_interleaved_nibble_order() -> None:
    from maverick_quant.compress.pack import AWQ_ORDER, from_awq_tensors, to_awq_tensors

    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (16, 2), generator=g, dtype=torch.uint8)
    qw = QuantizedWeight(codes, torch.rand(16, 2, generator=g).half(), zeros, 4, 32)
    tensors = to_awq_tensors(qw)
    assert tensors["qweight"].shape == (64, 2) and tensors["qzeros"].shape == (2, 2) and tensors["scales"].shape == (2, 16)
    word = int(tensors["qweight"][3, 1]) & 0xFFFFFFFF  # input column 3, output columns 8..15
    awq_gemm_order = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's / vLLM's, written out: not the module's own constant
    assert AWQ_ORDER == awq_gemm_order
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(codes[8 + awq_gemm_order[i], 3]) for i in range(8)]
    back = from_awq_tensors(tensors, 4, 32)
    assert torch.equal(back.codes, codes) and torch.equal(back.zeros, zeros) and torch.equal(back.scales, qw.scales)
    with pytest.raises(ValueError, match="multiple of the group size"):
        to_awq_tensors(QuantizedWeight(codes[:, :48], qw.scales, zeros, 4, 32))
