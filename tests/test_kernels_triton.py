"""Triton W4A16 kernels under the Triton interpreter (TRITON_INTERPRET=1, no GPU needed),
each compared with the plain-torch reference: GEMV with split-K, tiled GEMM, MoE decode and
aligned MoE, the dequantize kernel, symmetric and asymmetric, groups 32/64/128, fp32 and fp16
activations. With TRITON_INTERPRET=0 in the environment (benchmarks/gpu_check.sh, in its own
process) the same tests run the compiled kernels on a CUDA GPU."""

from __future__ import annotations

import os

COMPILED = os.environ.get("TRITON_INTERPRET") == "0"  # the compiled kernels, on the GPU (else conftest.py set 1)

import pytest
import torch

if not os.environ.get("MAVERICK_QUANT_REQUIRE_CLIENTS"):  # CI installs triton and requires these tests
    pytest.importorskip("triton")

from maverick_quant.compress.kernels import triton_w4  # noqa: E402
from maverick_quant.compress.kernels.backends import Backend, dequantize, get_backend  # noqa: E402
from maverick_quant.compress.kernels.layout import Int4Weight, concat_outputs  # noqa: E402
from maverick_quant.compress.kernels.triton_w4 import AlignedPairs, w4_dequantize, w4_gemm, w4_gemv  # noqa: E402
from tests.kernel_cases import random_quantized, routed_tokens  # noqa: E402

if COMPILED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 runs the compiled kernels, which need a CUDA GPU", allow_module_level=True)
DEVICE = "cuda" if COMPILED else "cpu"
REFERENCE = Backend()
# fp32: the kernels and torch sum in different orders; fp16: the input and the dequantized tile are fp16
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert (out.float() - expected).abs().max() <= TOLERANCE[dtype] * expected.abs().max()


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_split_k(group: int, symmetric: bool, split_k: int) -> None:
    weight = Int4Weight.from_quantized(random_quantized(40, 384, group, symmetric, seed=group)).to(DEVICE)  # 40: a ragged N block
    x = torch.randn(3, 384, device=DEVICE)
    assert_matches(w4_gemv(x, weight, split_k=split_k), REFERENCE.linear(x, weight), torch.float32)


@pytest.mark.parametrize("dtype,group,symmetric", [(torch.float32, 32, False), (torch.float16, 32, False),
                                                   (torch.float32, 128, False), (torch.float16, 128, False),
                                                   (torch.float32, 64, True), (torch.float16, 64, True)])
def test_tiled_gemm(dtype: torch.dtype, group: int, symmetric: bool) -> None:
    weight = Int4Weight.from_quantized(random_quantized(48, 384, group, symmetric=symmetric, seed=7)).to(DEVICE)
    x = torch.randn(21, 384, device=DEVICE)  # 21 rows: a ragged M block; K 384: 1.5 blocks of 256
    expected = REFERENCE.linear(x.to(dtype).float(), weight)
    assert_matches(w4_gemm(x.to(dtype), weight), expected, dtype)


def test_backend_picks_gemv_gemm_or_dequantize_by_rows_and_matches_for_each(monkeypatch) -> None:
    backend = get_backend("triton")
    weight = Int4Weight.from_quantized(random_quantized(32, 128, 64, True)).to(DEVICE)
    taken = []
    for name in ("w4_gemv", "w4_gemm", "w4_dequantize"):
        kernel = getattr(triton_w4, name)
        monkeypatch.setattr(triton_w4, name, lambda *a, _k=kernel, _n=name, **kw: taken.append(_n) or _k(*a, **kw))
    crossover = triton_w4.DEQUANTIZE_MATMUL_MIN_ROWS
    for rows in (1, 4, 5, 17, crossover - 1, crossover):
        x = torch.randn(rows, 128, device=DEVICE)
        assert_matches(backend.linear(x, weight), REFERENCE.linear(x, weight), torch.float32)
    assert taken == ["w4_gemv", "w4_gemv", "w4_gemm", "w4_gemm", "w4_gemm", "w4_dequantize"]


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_kernel_gives_the_bundle_value_exactly(group: int, symmetric: bool) -> None:
    """(q - z) * s in fp32, dense and stacked experts (39 rows: a ragged block), bit for bit."""
    dense = Int4Weight.from_quantized(random_quantized(39, 256, group, symmetric, seed=group)).to(DEVICE)
    experts = Int4Weight.from_quantized(random_quantized(39, 256, group, symmetric, experts=3, seed=group + 1)).to(DEVICE)
    for weight in (dense, experts):
        assert torch.equal(w4_dequantize(weight, torch.float32), dequantize(weight, torch.float32))
    assert torch.equal(w4_dequantize(dense, torch.float16), dequantize(dense, torch.float32).half())


def test_aligned_pairs_give_each_block_one_expert_and_every_pair_once() -> None:
    choice = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0], [1, 2]])  # expert 3 gets nothing
    aligned = AlignedPairs(choice, num_experts=4, block_m=4)
    pairs, sentinel = aligned.pairs.long(), choice.numel()
    real = pairs[pairs < sentinel]
    assert sorted(real.tolist()) == list(range(choice.numel()))
    block_of = torch.arange(pairs.numel()) // 4
    assert torch.equal(choice.reshape(-1)[real], aligned.block_expert[block_of[pairs < sentinel]].long())
    assert aligned.block_expert.tolist() == [0, 1, 2, 2]  # 3 pairs for 0, 2 for 1, 5 for 2 (two blocks), none for 3


@pytest.mark.parametrize("tokens,top_k", [(3, 1), (2, 2), (37, 1), (12, 2)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_moe_decode_and_aligned_paths_match_the_reference(tokens: int, top_k: int, symmetric: bool) -> None:
    """Few pairs: one GEMV program per (pair, output block) reading its expert; many: one
    aligned launch per projection. Expert 5 gets no token in either."""
    experts, hidden, inter = 6, 64, 32
    gate = random_quantized(inter, hidden, 32, symmetric, experts, 1)
    up = random_quantized(inter, hidden, 32, symmetric, experts, 2)
    down = random_quantized(hidden, inter, 32, symmetric, experts, 3)
    gate_up = concat_outputs([Int4Weight.from_quantized(gate), Int4Weight.from_quantized(up)]).to(DEVICE)
    down = Int4Weight.from_quantized(down).to(DEVICE)
    x, choice, scores = (t.to(DEVICE) for t in routed_tokens(tokens, hidden, experts, top_k, seed=tokens, skip_expert=5))
    act = torch.nn.functional.silu
    expected = REFERENCE.experts(x, choice, scores, REFERENCE.prepare_experts(gate_up), REFERENCE.prepare_experts(down), act)
    out = get_backend("triton").experts(x, choice, scores, gate_up, down, act)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_kernel_model_on_triton_equals_the_reference_kernels(smollm2_dir, tmp_path) -> None:
    """A whole tiny Llama 4 bundle (attention, dense MLP, shared and routed experts) through
    the Triton backend gives the reference backend's logits."""
    from click.testing import CliRunner

    from maverick_quant.bundle import Bundle
    from maverick_quant.cli import cli
    from maverick_quant.runtime import KernelModel
    from tests.conftest import make_tiny_llama4

    model_dir = make_tiny_llama4(smollm2_dir, tmp_path / "model", intermediate_size_mlp=64, num_hidden_layers=2)
    result = CliRunner().invoke(cli, ["quantize", str(model_dir), "--method", "rtn", "--group-size", "32", "--asym",
                                      "--out", str(tmp_path / "bundle"), "--no-progress"])
    assert result.exit_code == 0, result.output
    bundle = Bundle(tmp_path / "bundle")
    ids = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(KernelModel(bundle, "triton", device=DEVICE).forward(ids),
                               KernelModel(bundle, "reference", device=DEVICE).forward(ids),
                               rtol=1e-4, atol=1e-4)
