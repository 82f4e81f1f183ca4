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


@pytest.mark.skipif(not torch.cuda.is_available() or cuda_w4.nvcc_path() is None, reason="needs a CUDA GPU and nvcc")
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gemv_and_top1_expert_decode_match_the_reference(symmetric: bool, dtype: torch.dtype) -> None:
    reference, backend = Backend(), cuda_w4.CudaBackend()
    weight = Int4Weight.from_quantized(random_quantized(520, 1024, 128, symmetric)).to("cuda")
    x = torch.randn(2, 1024, device="cuda").to(dtype)
    expected = reference.linear(x.float(), weight)
    assert (backend.linear(x, weight).float() - expected).abs().max() <= 1e-2 * expected.abs().max()

    experts, hidden, inter = 4, 256, 128
    gate_up = concat_outputs([Int4Weight.from_quantized(random_quantized(inter, hidden, 64, symmetric, experts, s))
                              for s in (1, 2)]).to("cuda")
    down = Int4Weight.from_quantized(random_quantized(hidden, inter, 64, symmetric, experts, 3)).to("cuda")
    x, choice, scores = (t.cuda() for t in routed_tokens(1, hidden, experts, 1))
    act = torch.nn.functional.silu
    expected = reference.experts(x, choice, scores, reference.prepare_experts(gate_up), reference.prepare_experts(down), act)
    out = backend.experts(x.to(dtype), choice, scores, gate_up, down, act).float()
    assert (out - expected).abs().max() <= 2e-2 * expected.abs().max()
