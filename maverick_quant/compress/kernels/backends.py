"""Kernel backends behind one interface, the plain-torch reference they are all checked against,
and the choice of the best one available.

A backend turns an `Int4Weight` into its own prepared form once (`prepare`), then runs

    linear(x [M, K], w)                      -> y [M, N] = x W^T
    experts(x [T, D], choice [T, k], scores [T, k], gate_up [E, 2I, D], down [E, D, I], act)
                                             -> y [T, D] = sum_j down_e(act(g) * u),
                                                (g, u) = gate_up_e(x_t * score_tj), e = choice_tj

The expert math is Llama 4's: the router's sigmoid score multiplies the expert's INPUT, each
token runs only the experts it was routed to, and the k slots' outputs add up.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from maverick_quant.compress.kernels.layout import Int4Weight, SYMMETRIC_ZERO
from maverick_quant.compress.routing import group_by_expert
from maverick_quant.recipe import KERNEL_BACKENDS


def dequantize(weight: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [E?, N, K] in `dtype`: (code - zero) * scale, computed in fp32."""
    return weight.to_quantized().dequantize(dtype)


def swiglu(gate_up: torch.Tensor, act: Callable) -> torch.Tensor:
    """[..., 2I] gate and up side by side -> act(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


class Backend:
    """The reference backend: dequantize, then torch matmul (fp32 accumulation on CPU).
    Subclasses override `prepare` and `linear`, and `experts` when they have a fused MoE path."""

    name = "reference"

    def prepare(self, weight: Int4Weight) -> Any:
        return weight

    def prepare_experts(self, weight: Int4Weight) -> Any:
        """A stacked [E, N, K/2] weight, prepared; the default keeps one prepared form per expert."""
        return [self.prepare(weight[e]) for e in range(weight.num_experts)]

    def linear(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        return torch.nn.functional.linear(x, dequantize(weight, x.dtype))

    def experts(self, x: torch.Tensor, choice: torch.Tensor, scores: torch.Tensor, gate_up: Any, down: Any,
                act: Callable) -> torch.Tensor:
        """Routed experts, one expert at a time on its own tokens (see the module docstring)."""
        k = choice.shape[1]
        order, offsets = group_by_expert(choice, len(down))
        out = torch.zeros_like(x)
        flat_scores = scores.reshape(-1).to(x.dtype)
        for expert in range(len(down)):
            pairs = order[offsets[expert] : offsets[expert + 1]]
            if pairs.numel() == 0:
                continue
            tokens = pairs // k
            x_in = x[tokens] * flat_scores[pairs, None]
            hidden = swiglu(self.linear(x_in, gate_up[expert]), act)
            out.index_add_(0, tokens, self.linear(hidden, down[expert]).to(out.dtype))
        return out


class CpuInt4Backend(Backend):
    """torch's int4 CPU GEMM (`aten._weight_int4pack_mm_for_cpu`, bf16 activations).

    Its packed weight depends on the CPU's instruction set, so it is built here at load time
    and never written to disk. Its dequantization is (q - 8) * scale + zero per group with
    scale and zero in bf16 [G, N, 2]; ours is (q - z) * s, hence zero = (8 - z) * s.
    Needs N % 16 == 0; other shapes fall back to the reference.
    """

    name = "cpu-int4"

    def prepare(self, weight: Int4Weight) -> Any:
        if weight.out_features % 16:
            return weight
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes().to(torch.int32), 1)
        return packed, tinygemm_scales_and_zeros(weight), weight.group_size

    def linear(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        if isinstance(weight, Int4Weight):
            return super().linear(x, weight)
        packed, scales_and_zeros, group_size = weight
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16().contiguous(), packed, group_size, scales_and_zeros)
        return y.to(x.dtype)


def tinygemm_scales_and_zeros(weight: Int4Weight) -> torch.Tensor:
    """bf16 [G, N, 2] (scale, zero) of torch's int4 ops, whose dequantization is
    (q - 8) * scale + zero: zero = (8 - z) * s makes it our (q - z) * s."""
    scales = weight.scales.float()
    offsets = (SYMMETRIC_ZERO - weight.zero_points().float()) * scales
    return torch.stack((scales.T, offsets.T), dim=-1).contiguous().bfloat16()


def cpu_int4_available() -> bool:
    """Whether this torch build has the int4 CPU op (and it runs on this CPU)."""
    try:
        probe = CpuInt4Backend().prepare(Int4Weight(torch.zeros(16, 16, dtype=torch.uint8),
                                                     torch.ones(16, 1, dtype=torch.float16), None, 32))
        CpuInt4Backend().linear(torch.zeros(1, 32), probe)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


BACKENDS = KERNEL_BACKENDS


def triton_usable(device: torch.device) -> bool:
    """Triton runs on a CUDA device, or anywhere under TRITON_INTERPRET=1 (tests)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
    """The backend called `name`, or for "auto" the best one for `device`: CUDA C++, then
    Triton on a GPU; the int4 op, then the reference on a CPU."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r}: expected one of {BACKENDS}")
    if name == "auto":
        if device.type == "cuda":
            from maverick_quant.compress.kernels import cuda_w4

            name = "cuda" if cuda_w4.available() else "triton" if triton_usable(device) else "reference"
        else:
            name = "cpu-int4" if cpu_int4_available() else "reference"
    if name == "reference":
        return Backend()
    if name == "cpu-int4":
        if device.type != "cpu" or not cpu_int4_available():
            raise ValueError(f"kernel backend cpu-int4 needs the CPU and torch's _weight_int4pack_mm_for_cpu op "
                             f"(device {device}; op {'present' if cpu_int4_available() else 'missing in this torch build'})")
        return CpuInt4Backend()
    if name == "triton":
        if not triton_usable(device):
            raise ValueError(f"kernel backend triton needs a CUDA device or TRITON_INTERPRET=1 (device {device})")
        from maverick_quant.compress.kernels.triton_w4 import TritonBackend

        return TritonBackend()
    from maverick_quant.compress.kernels import cuda_w4

    if device.type != "cuda" or not cuda_w4.available():
        raise ValueError(f"kernel backend cuda needs a CUDA device, nvcc and its extension to build (device {device}; "
                         f"nvcc {cuda_w4.nvcc_path() or 'not found'})")
    return cuda_w4.CudaBackend()
