"""Triton W4A16 kernels on the runtime layout (`layout.Int4Weight`), dense and MoE.

- `_w4_gemv_kernel`: small M (decode). One program per (output row m, block of BLOCK_N
  outputs, K split); fp32 accumulation; split-K partial sums meet by atomic add in an fp32
  buffer. Per group g of a row, with codes q, zero z, scale s:
      y[m, n] += s[n, g] * (sum_k q[n, k] x[m, k]  -  z[n, g] * sum_k x[m, k])
  so the zero costs one multiply per group, not per code. The codes are unpacked into K
  order and multiply a contiguous [BLOCK_K] slice of x; each thread's 16 bytes of codes come in
  one 16-byte load (the row length K/2 is an argument, so the JIT marks it a multiple of 16).
  Optional per-row expert index (weights stacked [E, N, K/2]), per-row source token (x row =
  token[m]) and per-row score: that is the top-1 MoE decode path, one program per (token,
  output block). Tiling: `GemvConfig`.
- `_w4_dequantize_kernel`: W in the activation dtype in one pass, for dequantize + matmul past
  DEQUANTIZE_MATMUL_MIN_ROWS rows.
- `_w4_gemm_kernel`: larger M. Tiles [BLOCK_M, BLOCK_N], one group of K per step; the codes
  of a tile are unpacked (low and high nibbles interleaved back into K order), dequantized to
  the activation dtype in registers and fed to one `tl.dot` with the [BLOCK_M, GROUP] input
  tile, which is read contiguously (so Triton's pipeliner copies it asynchronously, 16 bytes
  a copy on sm_90: `maverick_quant.triton_sm90`). With MOE=True each M-block belongs to
  one expert: rows are (token, slot) pairs sorted and padded per expert in torch
  (`AlignedPairs`, as vLLM's `moe_align_block_size` does), then one launch runs all experts.
- Fused gate+up: experts and MLPs keep gate and up concatenated along N (`gate_up`
  [.., 2I, K/2]), so one launch reads the input once for both; act(gate) * up follows in torch.

The router score multiplies the expert's input in Llama 4; the kernels apply it to the
accumulator instead (equal by linearity, up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import triton
import triton.language as tl

from maverick_quant.compress.kernels.backends import Backend, swiglu
from maverick_quant.compress.kernels.layout import Int4Weight

GEMV_MAX_ROWS = 4
BLOCK_M_GEMM = 16
BLOCK_N_GEMM = 32
BLOCK_N_DEQUANTIZE = 32
# From this many rows a dense linear dequantizes its weight and calls torch's matmul (cuBLAS):
# the GEMM's small tiles lose to cuBLAS once the matmul is compute-bound. A guess until measured
# on a GPU: `benchmarks/kernel_speed.py` times both paths and prints the crossover per shape.
DEQUANTIZE_MATMUL_MIN_ROWS = 128


@triton.jit
def _dequantize_group(codes_ptrs, s_ptr, z_ptr, offs_n, mask_n, G, group,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """W [BLOCK_N, GROUP] fp32 of one group of rows offs_n: codes_ptrs [BLOCK_N, GROUP / 2] point
    at the group's bytes; code 2j is byte j's low nibble and code 2j + 1 its high one, so the
    nibbles are interleaved back into K order; W = (q - z) * s."""
    codes = tl.load(codes_ptrs, mask=mask_n[:, None], other=0)
    scales = tl.load(s_ptr + offs_n * G + group, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zeros = tl.load(z_ptr + offs_n * G + group, mask=mask_n, other=0).to(tl.float32)
    else:
        zeros = tl.full([BLOCK_N], 8.0, tl.float32)
    q = tl.reshape(tl.join(codes & 0xF, codes >> 4), (BLOCK_N, GROUP)).to(tl.float32)
    return (q - zeros[:, None]) * scales[:, None]


@triton.jit
def _w4_dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, w_row_bytes, G,
                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """out [N, K] = W in out's dtype; one program per (BLOCK_N rows, group)."""
    pid_n = tl.program_id(0)
    group = tl.program_id(1)
    HALF_G: tl.constexpr = GROUP // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n[:, None].to(tl.int64)
    w = _dequantize_group(w_ptr + rows * w_row_bytes + group * HALF_G + tl.arange(0, HALF_G)[None, :], s_ptr, z_ptr,
                          offs_n, mask_n, G, group, GROUP, BLOCK_N, HAS_ZEROS)
    out = out_ptr + rows * K + group * GROUP + tl.arange(0, GROUP)[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _w4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, row_expert_ptr, row_token_ptr, row_scale_ptr,
                    N, K, w_row_bytes, G, stride_xm, stride_om,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                    HAS_ZEROS: tl.constexpr, HAS_EXPERT: tl.constexpr, HAS_TOKEN: tl.constexpr,
                    HAS_SCALE: tl.constexpr):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    NG: tl.constexpr = BLOCK_K // GROUP
    HALF_G: tl.constexpr = GROUP // 2
    HALF_BK: tl.constexpr = BLOCK_K // 2
    half = w_row_bytes  # K / 2, passed in so the JIT can mark it a multiple of 16 (16-byte loads)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if HAS_EXPERT:
        expert = tl.load(row_expert_ptr + m).to(tl.int64)
        w_ptr += expert * N * half
        s_ptr += expert * N * G
        if HAS_ZEROS:
            z_ptr += expert * N * G
    x_row = m
    if HAS_TOKEN:
        x_row = tl.load(row_token_ptr + m)
    x_base = x_ptr + x_row.to(tl.int64) * stride_xm
    offs_j = tl.arange(0, HALF_BK)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, NG)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        byte = k0 // 2 + offs_j
        mask_k = byte < half
        codes = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * half + byte[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0)
        x = tl.load(x_base + k0 + offs_k, mask=(k0 + offs_k) < K, other=0.0).to(tl.float32)  # [BLOCK_K]
        q = tl.reshape(tl.join(codes & 0xF, codes >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)  # K order
        dots_g = tl.sum(tl.reshape(q * x[None, :], (BLOCK_N, NG, GROUP)), axis=2)
        x_sum_g = tl.sum(tl.reshape(x, (NG, GROUP)), axis=1)
        group = k0 // GROUP + offs_g
        mask_ng = mask_n[:, None] & (group < G)[None, :]
        group_offsets = offs_n[:, None].to(tl.int64) * G + group[None, :]
        scales = tl.load(s_ptr + group_offsets, mask=mask_ng, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zeros = tl.load(z_ptr + group_offsets, mask=mask_ng, other=0).to(tl.float32)
        else:
            zeros = tl.full([BLOCK_N, NG], 8.0, tl.float32)
        acc += tl.sum(scales * (dots_g - zeros * x_sum_g[None, :]), axis=1)
    if HAS_SCALE:
        acc = acc * tl.load(row_scale_ptr + m).to(tl.float32)
    out = out_ptr + m.to(tl.int64) * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask_n)
    else:
        tl.atomic_add(out, acc, mask=mask_n, sem="relaxed")  # partial sums: no ordering needed


@triton.jit
def _w4_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, pairs_ptr, block_expert_ptr, pair_scale_ptr,
                    M, N, K, w_row_bytes, G, stride_xm, stride_om,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr,
                    MOE: tl.constexpr, TOP_K: tl.constexpr, GATHER_TOKENS: tl.constexpr, HAS_SCALE: tl.constexpr,
                    IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HALF_G: tl.constexpr = GROUP // 2
    half = w_row_bytes  # K / 2, passed in so the JIT can mark it a multiple of 16 (16-byte loads)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if MOE:
        pairs = tl.load(pairs_ptr + offs_m)
        mask_m = pairs < M
        out_rows = pairs
        if GATHER_TOKENS:
            x_rows = pairs // TOP_K
        else:
            x_rows = pairs
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        w_ptr += expert * N * half
        s_ptr += expert * N * G
        if HAS_ZEROS:
            z_ptr += expert * N * G
    else:
        mask_m = offs_m < M
        out_rows = offs_m
        x_rows = offs_m
    offs_k = tl.arange(0, GROUP)
    offs_j = tl.arange(0, HALF_G)
    x_rows_base = x_ptr + x_rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_rows_base = w_ptr + offs_n[:, None].to(tl.int64) * half + offs_j[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for group in range(0, G):
        x = tl.load(x_rows_base + group * GROUP, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, GROUP], contiguous
        w = _dequantize_group(w_rows_base + group * HALF_G, s_ptr, z_ptr, offs_n, mask_n, G, group,
                              GROUP, BLOCK_N, HAS_ZEROS).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_SCALE:
        acc = acc * tl.load(pair_scale_ptr + out_rows, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + out_rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _zeros_or_dummy(weight: Int4Weight) -> torch.Tensor:
    return weight.zeros if weight.zeros is not None else weight.scales  # never read when HAS_ZEROS is False


@dataclass
class Launch:
    """One kernel launch, built but not yet run: `run` launches it on the tensors' device, and
    `maverick_quant.triton_sm90` compiles exactly this specialization ahead of time for a GPU it lacks."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    keywords: dict[str, Any]  # the constexprs, and launch options such as num_warps
    out: torch.Tensor

    def run(self) -> torch.Tensor:
        if self.out.numel():
            self.kernel[self.grid](*self.args, **self.keywords)
        return self.out


def streaming_multiprocessors(device: torch.device) -> int | None:
    """The device's SM count (None off a GPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


@dataclass(frozen=True)
class GemvConfig:
    """The GEMV's tiling: outputs and inputs per program (block_k is raised to the group size),
    the programs per streaming multiprocessor that split-K aims for, and warps per program.
    The default is a guess until timed on a GPU (`kernel_speed.py --sweep-gemv`)."""

    block_n: int = 32
    block_k: int = 128
    programs_per_sm: int = 4
    num_warps: int = 4


DEFAULT_GEMV = GemvConfig()


def split_k_for(rows: int, n_blocks: int, k_blocks: int, sms: int | None, programs_per_sm: int) -> int:
    """K splits so that a GEMV launches about `programs_per_sm` programs per streaming
    multiprocessor (2 off a GPU, where only the interpreter runs it)."""
    if sms is None:
        return min(2, k_blocks)
    return max(1, min(k_blocks, programs_per_sm * sms // max(1, rows * n_blocks)))


def gemv_launch(x: torch.Tensor, weight: Int4Weight, rows: int | None = None, row_expert: torch.Tensor | None = None,
                row_token: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
                split_k: int | None = None, sms: int | None = None, config: GemvConfig = DEFAULT_GEMV) -> Launch:
    """The GEMV launch of `w4_gemv` (same arguments; `sms` defaults to x's device's SM count)."""
    n, k = weight.out_features, weight.in_features
    rows = x.shape[0] if rows is None else rows
    n_blocks = triton.cdiv(n, config.block_n)
    block_k = max(config.block_k, weight.group_size)
    sms = streaming_multiprocessors(x.device) if sms is None else sms
    split = split_k or split_k_for(rows, n_blocks, triton.cdiv(k, block_k), sms, config.programs_per_sm)
    out = torch.zeros(rows, n, dtype=torch.float32, device=x.device)
    dummy = weight.scales
    args = (x, weight.packed, weight.scales, _zeros_or_dummy(weight), out,
            dummy if row_expert is None else row_expert, dummy if row_token is None else row_token,
            dummy if row_scale is None else row_scale,
            n, k, k // 2, weight.scales.shape[-1], x.stride(0), out.stride(0))
    keywords = dict(GROUP=weight.group_size, BLOCK_N=config.block_n, BLOCK_K=block_k, SPLIT_K=split,
                      HAS_ZEROS=weight.zeros is not None, HAS_EXPERT=row_expert is not None,
                      HAS_TOKEN=row_token is not None, HAS_SCALE=row_scale is not None, num_warps=config.num_warps)
    return Launch(_w4_gemv_kernel, (rows, n_blocks, split), args, keywords, out)


def w4_gemv(x: torch.Tensor, weight: Int4Weight, rows: int | None = None, row_expert: torch.Tensor | None = None,
            row_token: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
            split_k: int | None = None) -> torch.Tensor:
    """y [rows, N] fp32: row m = (x[row_token[m]] W_e^T) * row_scale[m], e = row_expert[m]
    (each optional: token m, dense weight, no scale). x [T, K] fp16/bf16/fp32."""
    return gemv_launch(x, weight, rows, row_expert, row_token, row_scale, split_k).run()


def gemm_launch(x: torch.Tensor, weight: Int4Weight, moe: "AlignedPairs | None" = None, gather_tokens: bool = False,
                pair_scale: torch.Tensor | None = None, rows: int | None = None) -> Launch:
    """The tiled GEMM launch of `w4_gemm` (same arguments)."""
    n, k = weight.out_features, weight.in_features
    rows = x.shape[0] if rows is None else rows
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    dummy = weight.scales
    m_blocks = moe.block_expert.numel() if moe is not None else triton.cdiv(rows, BLOCK_M_GEMM)
    args = (x, weight.packed, weight.scales, _zeros_or_dummy(weight), out,
            dummy if moe is None else moe.pairs, dummy if moe is None else moe.block_expert,
            dummy if pair_scale is None else pair_scale,
            rows, n, k, k // 2, weight.scales.shape[-1], x.stride(0), out.stride(0))
    keywords = dict(GROUP=weight.group_size, BLOCK_M=BLOCK_M_GEMM, BLOCK_N=BLOCK_N_GEMM,
                      HAS_ZEROS=weight.zeros is not None, MOE=moe is not None,
                      TOP_K=moe.top_k if moe is not None else 1, GATHER_TOKENS=gather_tokens,
                      HAS_SCALE=pair_scale is not None, IEEE=x.dtype == torch.float32)
    return Launch(_w4_gemm_kernel, (m_blocks, triton.cdiv(n, BLOCK_N_GEMM)), args, keywords, out)


def w4_gemm(x: torch.Tensor, weight: Int4Weight, moe: "AlignedPairs | None" = None, gather_tokens: bool = False,
            pair_scale: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
    """y [rows, N] in x's dtype = x W^T, tiled; with `moe`, rows are (token, slot) pairs and each
    M-block runs its expert's weight (x rows are tokens when `gather_tokens`, else pairs)."""
    return gemm_launch(x, weight, moe, gather_tokens, pair_scale, rows).run()


def dequantize_launch(weight: Int4Weight, dtype: torch.dtype) -> Launch:
    """The launch of `w4_dequantize` (a stacked [E, N, K/2] weight runs as E*N rows)."""
    rows, k = weight.packed.numel() * 2 // weight.in_features, weight.in_features
    out = torch.empty(*weight.packed.shape[:-1], k, dtype=dtype, device=weight.packed.device)
    args = (weight.packed, weight.scales, _zeros_or_dummy(weight), out, rows, k, k // 2, weight.scales.shape[-1])
    keywords = dict(GROUP=weight.group_size, BLOCK_N=BLOCK_N_DEQUANTIZE, HAS_ZEROS=weight.zeros is not None)
    return Launch(_w4_dequantize_kernel, (triton.cdiv(rows, BLOCK_N_DEQUANTIZE), weight.scales.shape[-1]), args,
                  keywords, out)


def w4_dequantize(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [E?, N, K] in `dtype`, in one pass over the codes (read K/2 bytes, write K values a row)."""
    return dequantize_launch(weight, dtype).run()


class AlignedPairs:
    """(token, slot) pairs sorted by expert, each expert's run padded to a multiple of `block_m`.

    pairs [P_pad] int32: pair index p = token * k + slot, or the sentinel T*k in padding;
    block_expert [P_pad / block_m] int32: the expert of each M-block (empty experts get none).
    """

    def __init__(self, choice: torch.Tensor, num_experts: int, block_m: int):
        tokens, self.top_k = choice.shape
        flat = choice.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        padded = (counts + block_m - 1) // block_m * block_m
        starts = torch.cumsum(padded, 0) - padded
        first_of_expert = torch.cumsum(counts, 0) - counts
        sorted_experts = flat[order]
        rank = torch.arange(flat.numel(), device=flat.device) - first_of_expert[sorted_experts]
        self.pairs = torch.full((int(padded.sum()),), tokens * self.top_k, dtype=torch.int32, device=flat.device)
        self.pairs[starts[sorted_experts] + rank] = order.to(torch.int32)
        experts = torch.arange(num_experts, device=flat.device, dtype=torch.int32)
        self.block_expert = experts.repeat_interleave(padded // block_m)


class TritonBackend(Backend):
    """GEMV for up to GEMV_MAX_ROWS rows, tiled GEMM past that, and from DEQUANTIZE_MATMUL_MIN_ROWS
    rows the weight dequantized in one pass, then torch's matmul (cuBLAS on a GPU); MoE by the top-k
    decode GEMV for few tokens, by one aligned launch per projection otherwise (dequantizing every
    expert would write all of them in float)."""

    name = "triton"

    def prepare(self, weight: Int4Weight) -> Int4Weight:
        return weight

    def prepare_experts(self, weight: Int4Weight) -> Int4Weight:
        return weight

    def linear(self, x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
        x = x.contiguous()
        if x.shape[0] <= GEMV_MAX_ROWS:
            return w4_gemv(x, weight).to(x.dtype)
        if x.shape[0] >= DEQUANTIZE_MATMUL_MIN_ROWS:
            return torch.nn.functional.linear(x, w4_dequantize(weight, x.dtype))
        return w4_gemm(x, weight)

    def experts(self, x: torch.Tensor, choice: torch.Tensor, scores: torch.Tensor, gate_up: Int4Weight,
                down: Int4Weight, act: Callable) -> torch.Tensor:
        x = x.contiguous()
        tokens, top_k = choice.shape
        pair_scale = scores.reshape(-1).float().contiguous()
        if tokens * top_k <= GEMV_MAX_ROWS:
            pair_expert = choice.reshape(-1).to(torch.int32).contiguous()
            pair_token = torch.arange(tokens * top_k, device=x.device, dtype=torch.int32) // top_k
            hidden = swiglu(w4_gemv(x, gate_up, tokens * top_k, pair_expert, pair_token, pair_scale), act).to(x.dtype)
            routed = w4_gemv(hidden, down, row_expert=pair_expert).to(x.dtype)
        else:
            aligned = AlignedPairs(choice, gate_up.num_experts, BLOCK_M_GEMM)
            gate_up_out = w4_gemm(x, gate_up, aligned, gather_tokens=True, pair_scale=pair_scale, rows=tokens * top_k)
            routed = w4_gemm(swiglu(gate_up_out, act).contiguous(), down, aligned, rows=tokens * top_k)
        return routed.view(tokens, top_k, -1).sum(dim=1)
