"""The CUDA C++ W4A16 GEMV (`w4a16_gemv.cu`), built at run time with `load_inline`.

It covers the case that matters most for Maverick: batch-1 decode, dense linears and the
top-1 routed expert (per-row expert index, source token and router score). Larger batches go
to the Triton GEMM when Triton is there, else to dequantize + cuBLAS.

`compile_check` compiles the source with nvcc against torch's headers without a GPU or a
CUDA build of torch (what CI can check on a machine with nvcc), and `available` says whether
the extension can be built and run here.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Callable

import torch

from maverick_quant.compress.kernels.backends import Backend, swiglu
from maverick_quant.compress.kernels.layout import Int4Weight

SOURCE = Path(__file__).with_name("w4a16_gemv.cu")
DECLARATION = ("torch::Tensor w4a16_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, "
               "std::optional<torch::Tensor> zeros, std::optional<torch::Tensor> row_expert, "
               "std::optional<torch::Tensor> row_token, std::optional<torch::Tensor> row_scale, "
               "int64_t rows, int64_t group_size, int64_t stream);")
GEMV_MAX_ROWS = 8


def nvcc_path() -> str | None:
    """nvcc from CUDA_HOME, else from PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def compile_check(out_dir: Path, arch: str = "sm_90") -> subprocess.CompletedProcess:
    """Compile the extension's CUDA source to an object file (no link, no GPU needed); ptxas
    reports each kernel's registers and spills on stderr (`ptxas_spills` reads them)."""
    from torch.utils.cpp_extension import include_paths

    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    includes = [f"-I{path}" for path in [*include_paths(), sysconfig.get_paths()["include"]]]
    command = [nvcc, "-c", str(SOURCE), "-o", str(out_dir / "w4a16_gemv.o"), "-std=c++20", f"-arch={arch}",
               "-O3", "--expt-relaxed-constexpr", "-Xptxas=-v", "-DTORCH_EXTENSION_NAME=mq_w4a16", *includes]
    return subprocess.run(command, capture_output=True, text=True)


def ptxas_spills(ptxas_report: str) -> list[tuple[int, int]]:
    """(spill store bytes, spill load bytes) of each kernel in `ptxas -v` output."""
    return [(int(stores), int(loads)) for stores, loads in
            re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_report)]


@functools.lru_cache(maxsize=1)
def _extension():
    from torch.utils.cpp_extension import load_inline

    return load_inline(name="mq_w4a16_gemv", cpp_sources=DECLARATION, cuda_sources=SOURCE.read_text(),
                       functions=["w4a16_gemv"], extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"], verbose=False)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """A CUDA device, nvcc, and the extension builds."""
    if not torch.cuda.is_available() or nvcc_path() is None:
        return False
    try:
        _extension()
    except (RuntimeError, OSError, subprocess.CalledProcessError):
        return False
    return True


def w4a16_gemv(x: torch.Tensor, weight: Int4Weight, rows: int | None = None, row_expert: torch.Tensor | None = None,
               row_token: torch.Tensor | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y [rows, N] in x's dtype (fp16/bf16): see the CUDA source for the per-row options."""
    rows = x.shape[0] if rows is None else rows
    return _extension().w4a16_gemv(x.contiguous(), weight.packed, weight.scales, weight.zeros, row_expert, row_token,
                                   row_scale, rows, weight.group_size, torch.cuda.current_stream(x.device).cuda_stream)


class CudaBackend(Backend):
    """CUDA C++ GEMV for decode; Triton (or dequantize + cuBLAS) past GEMV_MAX_ROWS rows."""

    name = "cuda"

    def __init__(self):
        from maverick_quant.compress.kernels.backends import triton_usable

        if triton_usable(torch.device("cuda")):
            from maverick_quant.compress.kernels.triton_w4 import TritonBackend

            self.large: Backend = TritonBackend()
        else:
            self.large = Backend()

    def prepare(self, weight: Int4Weight) -> Int4Weight:
        return weight

    def prepare_experts(self, weight: Int4Weight) -> Int4Weight:
        return weight

    def linear(self, x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
        """The CUDA GEMV for up to GEMV_MAX_ROWS fp16/bf16 rows; fp32 rows (validate's default)
        go to the fp32-capable path rather than being rounded to half precision."""
        if x.shape[0] > GEMV_MAX_ROWS or x.dtype == torch.float32:
            return self.large.linear(x, weight)
        return w4a16_gemv(x, weight)

    def experts(self, x: torch.Tensor, choice: torch.Tensor, scores: torch.Tensor, gate_up: Int4Weight,
                down: Int4Weight, act: Callable) -> torch.Tensor:
        tokens, top_k = choice.shape
        if tokens * top_k > GEMV_MAX_ROWS or x.dtype == torch.float32:
            return self.large.experts(x, choice, scores, self.large.prepare_experts(gate_up),
                                      self.large.prepare_experts(down), act)
        pair_expert = choice.reshape(-1).to(torch.int32).contiguous()
        pair_token = torch.arange(tokens * top_k, device=x.device, dtype=torch.int32) // top_k
        pair_scale = scores.reshape(-1).float().contiguous()
        hidden = swiglu(w4a16_gemv(x, gate_up, tokens * top_k, pair_expert, pair_token, pair_scale), act)
        routed = w4a16_gemv(hidden.contiguous(), down, row_expert=pair_expert)
        return routed.view(tokens, top_k, -1).sum(dim=1)
