"""The Triton kernels compiled ahead of time for a GPU this machine lacks (default sm_90, the
H100), and what the compiled code costs: registers, spills, shared memory, global load widths.

Each case is a real `triton_w4.Launch` built on meta tensors with Maverick's shapes, then
compiled with the argument specialization Triton's JIT would give that launch (integers and
pointers divisible by 16 marked so, the same constexprs) and Triton's own ptxas. So what the
interpreter tests check for correctness is also known to compile for the GPU, without
spilling, and with the weight codes read in wide loads. It says nothing about speed.

    python -m maverick_quant.triton_sm90 [--arch 90] [--json]

Run it with TRITON_INTERPRET unset: under the interpreter `triton.jit` makes no compilable
function (the test runs it in a subprocess for that reason). It lives outside `compress/`
because it runs ptxas/cuobjdump, writes temporary files and prints: `compress/` stays
tensors in, tensors out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from maverick_quant.arch.llama4 import maverick_linear_shapes
from maverick_quant.compress.kernels.layout import Int4Weight
from maverick_quant.compress.kernels.triton_w4 import (BLOCK_M_GEMM, AlignedPairs, GemvConfig, Launch,
                                                       dequantize_launch, gemm_launch, gemv_launch)

H100_SMS = 132
META = torch.device("meta")


@dataclass
class KernelCost:
    """What one compiled specialization costs on the target (from the cubin and the PTX)."""

    case: str
    kernel: str
    registers: int
    spill_bytes: int  # local memory per thread: registers spilled
    stack_bytes: int
    shared_bytes: int
    global_loads: dict[str, int]  # PTX ld.global variant -> count, e.g. {"v4.b32": 2, "b16": 4}
    async_copy_bytes: dict[str, int]  # cp.async bytes per copy -> count

    def widest_code_load_bytes(self) -> int:
        """Bytes of the widest global read (plain load or async copy) in the kernel."""
        widths = [load_bytes(variant) for variant in self.global_loads]
        widths += [int(size) for size in self.async_copy_bytes]
        return max(widths, default=0)


def load_bytes(variant: str) -> int:
    """Bytes one PTX `ld.global.<variant>` reads per thread: "v4.b32" -> 16, "b16" -> 2."""
    match = re.fullmatch(r"(?:[a-z]+\.)*?(?:v(\d)\.)?[a-z]+(\d+)", variant)
    if match is None:
        raise ValueError(f"unrecognised PTX load variant {variant!r}")
    return int(match.group(1) or 1) * int(match.group(2)) // 8


def compile_launch(launch: Launch, target: GPUTarget):
    """Compile `launch` for `target` as the JIT would on that GPU (no GPU needed)."""
    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.keywords)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.keywords, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def cuobjdump() -> str:
    """Triton's bundled cuobjdump, else one on PATH."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump not found (Triton's NVIDIA backend bundles one)")
    return found


def kernel_cost(case: str, compiled) -> KernelCost:
    """Registers, spills and shared memory from the cubin; load widths from the PTX."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    return KernelCost(case=case, kernel=compiled.name, registers=int(fields["REG"]), spill_bytes=int(fields["LOCAL"]),
                      stack_bytes=int(fields["STACK"]), shared_bytes=int(fields["SHARED"]),
                      global_loads=dict(Counter(re.findall(r"ld\.global\.((?:[a-z0-9]+\.)*[a-z]+\d+)", ptx))),
                      async_copy_bytes=dict(Counter(str(int(size, 0)) for size in re.findall(
                          r"cp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+)", ptx))))


def _weight(n: int, k: int, group: int, symmetric: bool, experts: int | None = None) -> Int4Weight:
    lead = (experts,) if experts else ()
    zeros = None if symmetric else torch.empty(*lead, n, k // group, dtype=torch.uint8, device=META)
    return Int4Weight(torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=META),
                      torch.empty(*lead, n, k // group, dtype=torch.float16, device=META), zeros, group)


def _activations(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(rows, k, dtype=dtype, device=META)


def _aligned(tokens: int, experts: int) -> AlignedPairs:
    """Pairs of `tokens` top-1 tokens spread over `experts` (only the shapes matter here)."""
    return AlignedPairs(torch.arange(tokens).remainder(experts)[:, None], experts, BLOCK_M_GEMM)


def maverick_cases(sms: int = H100_SMS) -> dict[str, Launch]:
    """Every kernel specialization the Triton backend launches for Maverick, on meta tensors:
    GEMV (decode), tiled GEMM and the dequantize kernel, dense and expert, symmetric and asymmetric, groups 32/64/128,
    bf16 and fp16 activations (fp32 too for the GEMM, whose dot then runs in IEEE fp32)."""
    shapes = maverick_linear_shapes()
    (n, k), (n_up, hidden), (n_down, inter) = shapes["qkv"], shapes["expert gate+up"], shapes["expert down"]
    experts, bf16 = 128, torch.bfloat16
    one = torch.empty(1, dtype=torch.int32, device=META)
    cases = {}
    for group in (32, 64, 128):
        for symmetric in (True, False):
            grid = f"g{group} {'sym' if symmetric else 'asym'}"
            cases[f"gemv qkv M=1 {grid}"] = gemv_launch(_activations(1, k, bf16), _weight(n, k, group, symmetric), sms=sms)
            cases[f"gemm qkv M=64 {grid}"] = gemm_launch(_activations(64, k, bf16), _weight(n, k, group, symmetric))
    for tiling in gemv_tilings():  # what `kernel_speed.py --sweep-gemv` times on a GPU
        cases[f"gemv qkv M=1 g128 sym {tiling.block_n}x{tiling.block_k} {tiling.num_warps} warps"] = gemv_launch(
            _activations(1, k, bf16), _weight(n, k, 128, True), sms=sms, config=tiling)
    cases["gemv qkv M=1 g128 sym unsplit"] = gemv_launch(_activations(1, k, bf16), _weight(n, k, 128, True), split_k=1, sms=sms)
    cases["gemv qkv M=1 g128 sym fp16"] = gemv_launch(_activations(1, k, torch.float16), _weight(n, k, 128, True), sms=sms)
    for symmetric in (True, False):
        grid = f"g128 {'sym' if symmetric else 'asym'}"
        gate_up, down = _weight(n_up, hidden, 128, symmetric, experts), _weight(n_down, inter, 128, symmetric, experts)
        cases[f"gemv expert gate+up top-1 {grid}"] = gemv_launch(_activations(1, hidden, bf16), gate_up, 1, one, one,
                                                                  one.float(), sms=sms)
        cases[f"gemv expert down top-1 {grid}"] = gemv_launch(_activations(1, inter, bf16), down, row_expert=one, sms=sms)
        aligned = _aligned(256, experts)
        scores = torch.empty(256, dtype=torch.float32, device=META)
        cases[f"gemm expert gate+up 256 tokens {grid}"] = gemm_launch(_activations(256, hidden, bf16), gate_up, aligned,
                                                                       True, scores, 256)
        cases[f"gemm expert down 256 tokens {grid}"] = gemm_launch(_activations(256, inter, bf16), down, aligned, rows=256)
    for symmetric in (True, False):
        cases[f"dequantize qkv g128 {'sym' if symmetric else 'asym'}"] = dequantize_launch(_weight(n, k, 128, symmetric), bf16)
    cases["gemm qkv M=64 g128 sym fp16"] = gemm_launch(_activations(64, k, torch.float16), _weight(n, k, 128, True))
    cases["gemm qkv M=64 g128 sym fp32"] = gemm_launch(_activations(64, k, torch.float32), _weight(n, k, 128, True))
    return cases


def gemv_tilings(programs_per_sm: tuple[int, ...] = (GemvConfig.programs_per_sm,)) -> list[GemvConfig]:
    """The GEMV tilings worth timing: outputs 16/32/64 and inputs 128/256 per program, 4/8 warps,
    and the split-K targets `programs_per_sm` (which change the grid, not the compiled code)."""
    return [GemvConfig(*values) for values in itertools.product((16, 32, 64), (128, 256), programs_per_sm, (4, 8))]


def compile_all(arch: int = 90) -> list[KernelCost]:
    target = GPUTarget("cuda", arch, 32)
    return [kernel_cost(case, compile_launch(launch, target)) for case, launch in maverick_cases().items()]


def _loads_text(cost: KernelCost) -> str:
    loads = [f"{variant}x{count}" for variant, count in sorted(cost.global_loads.items())]
    loads += [f"cp.async {size} B x{count}" for size, count in sorted(cost.async_copy_bytes.items())]
    return ", ".join(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100).")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a Markdown table.")
    args = parser.parse_args()
    costs = compile_all(args.arch)
    if args.json:
        print(json.dumps([asdict(cost) for cost in costs], indent=1))
        return
    print(f"Triton {triton.__version__}, sm_{args.arch}\n")
    print("| case | registers | spilled B | shared B | global reads per thread |")
    print("|---|---|---|---|---|")
    for cost in costs:
        print(f"| {cost.case} | {cost.registers} | {cost.spill_bytes} | {cost.shared_bytes} | {_loads_text(cost)} |")


if __name__ == "__main__":
    main()
