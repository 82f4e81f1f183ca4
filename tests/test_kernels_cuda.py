"""The CUDA C++ GEMV: compiled with nvcc wherever nvcc exists (no GPU needed), and run
against the torch reference where a GPU is (never required by the suite)."""

from __future__ import annotations

import os

import pytest
import torch

from maverick_quant.compress.kernels import cuda_w4
from maverick_quant.compress.kernels.backends import Backend
from maverick_quant.compress.kernels.layout import Int4Weight, concat_outputs
from tests.kernel_cases import random_quantized, routed_tokens


def test_cuda_source_compiles_with_nvcc(tmp_path) -> None:
    if cuda_w4.nvcc_path() is None:
        if os.environ.get("MAVERICK_QUANT_REQUIRE_NVCC"):
            pytest.fail("MAVERICK_QUANT_REQUIRE_NVCC is set but nvcc is not found")
        pytest.skip("nvcc not found")
    result = cuda_w4.compile_check(tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "w4a16_gemv.o").stat().st_size > 0
    spills = cuda_w4.ptxas_spills(result.stderr)
    assert len(spills) == 4, result.stderr[-4000:]  # fp16 and bf16, with and without zeros
    assert spills == [(0, 0)] * 4, result.stderr[-4000:]


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available() or cuda_w4.nvcc_path() is None, reason="needs a CUDA GPU and nvcc")


@NEEDS_GPU
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,group", [(520, 128), (523, 32), (517, 64)])  # 523, 517: a ragged last block of rows
def test_cuda_gemv_matches_the_reference(symmetric: bool, dtype: torch.dtype, n: int, group: int) -> None:
    reference, backend = Backend(), cuda_w4.CudaBackend()
    weight = Int4Weight.from_quantized(random_quantized(n, 1024, group, symmetric)).to("cuda")
    x = torch.randn(2, 1024, device="cuda").to(dtype)
    expected = reference.linear(x.float(), weight)
    assert (backend.linear(x, weight).float() - expected).abs().max() <= 1e-2 * expected.abs().max()


@NEEDS_GPU
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,top_k", [(1, 1), (5, 1), (3, 2)])  # up to GEMV_MAX_ROWS (token, slot) pairs
def test_cuda_expert_decode_matches_the_reference(symmetric: bool, dtype: torch.dtype, tokens: int, top_k: int) -> None:
    reference, backend = Backend(), cuda_w4.CudaBackend()
    experts, hidden, inter = 4, 256, 128
    gate_up = concat_outputs([Int4Weight.from_quantized(random_quantized(inter, hidden, 64, symmetric, experts, s))
                              for s in (1, 2)]).to("cuda")
    down = Int4Weight.from_quantized(random_quantized(hidden, inter, 64, symmetric, experts, 3)).to("cuda")
    x, choice, scores = (t.cuda() for t in routed_tokens(tokens, hidden, experts, top_k))
    act = torch.nn.functional.silu
    expected = reference.experts(x, choice, scores, reference.prepare_experts(gate_up), reference.prepare_experts(down), act)
    out = backend.experts(x.to(dtype), choice, scores, gate_up, down, act).float()
    assert (out - expected).abs().max() <= 2e-2 * expected.abs().max()
