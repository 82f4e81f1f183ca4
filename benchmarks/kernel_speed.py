"""4-bit kernel speed on Maverick's real shapes: time, effective bandwidth, speedups.

For each linear shape (qkv, o, dense MLP gate+up / down at 16384, expert gate+up / down at
8192) and M = 1, 16, 64, 128 tokens, times every available kernel backend against the float
matmul of the dequantized weight, and a whole Maverick MoE layer (router, shared expert,
top-1 routed expert) at M = 1.

    python benchmarks/kernel_speed.py [--backends cuda triton cpu-int4] [--m 1 16 64 128] [--experts 128] [--json out.json]

On a GPU: effective GB/s = bytes read (packed codes + scales + zeros + activations) / time,
as a percent of the measured device-to-device copy bandwidth (2 x bytes / time of a 1 GiB
copy), speedup over bf16 `torch.matmul` and over torch's own int4 op
(`aten._weight_int4pack_mm`, tinygemm) where it runs. On a CPU: the CPU int4 path against
fp32 and bf16 matmul (`--experts` defaults to 8 there: at M = 1 only one expert is read).
On a GPU it also times, past the GEMV's rows, the tiled GEMM against dequantize + bf16 matmul
(M = 256 and 1024 are added for that) and prints the M from which the second wins per shape:
the measured value for `triton_w4.DEQUANTIZE_MATMUL_MIN_ROWS`. `--sweep-gemv` (GPU) times the
Triton GEMV's tilings (`GemvConfig`) at M = 1 instead: the measured value for `DEFAULT_GEMV`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from maverick_quant.arch.llama4 import MAVERICK_TEXT, maverick_linear_shapes
from maverick_quant.compress.kernels.backends import get_backend, tinygemm_scales_and_zeros, triton_usable
from maverick_quant.compress.kernels.layout import Int4Weight
from maverick_quant.runtime import QuantLinear, QuantMoE

SHAPES = maverick_linear_shapes()  # name: (N outputs, K inputs)
HIDDEN, EXPERT_INTER = MAVERICK_TEXT["hidden_size"], MAVERICK_TEXT["intermediate_size"]
GROUP = 128


def random_weight(n: int, k: int, device: str, experts: int | None = None) -> Int4Weight:
    lead = (experts,) if experts else ()
    packed = torch.randint(0, 256, lead + (n, k // 2), dtype=torch.uint8, device=device)
    scales = (torch.rand(lead + (n, k // GROUP), device=device) * 0.01 + 0.001).half()
    return Int4Weight(packed, scales, None, GROUP)


def timed(fn, device: str, min_seconds: float = 0.5, max_iters: int = 200) -> float:
    """Median seconds per call after a warm-up (CUDA events on a GPU)."""
    fn()
    samples: list[float] = []
    spent = 0.0
    while spent < min_seconds and len(samples) < max_iters:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            started = time.perf_counter()
            fn()
            seconds = time.perf_counter() - started
        samples.append(seconds)
        spent += seconds
    return statistics.median(samples)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write)."""
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() / timed(lambda: target.copy_(source), device)


def torch_int4_op(weight: Int4Weight, device: str):
    """torch's own int4 matmul on this weight (tinygemm on CUDA, the CPU kernel on a CPU), or None."""
    codes = weight.codes().to(torch.int32)
    scales_and_zeros = tinygemm_scales_and_zeros(weight)
    try:
        if device == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(codes.to(torch.uint8)[:, ::2] << 4 | codes.to(torch.uint8)[:, 1::2], 8)
            return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, scales_and_zeros)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros)
    except (RuntimeError, NotImplementedError):
        return None


def bench_linear(name: str, n: int, k: int, rows: list[int], backends: list[str], device: str, copy_bw: float) -> list[dict]:
    weight = random_weight(n, k, device)
    dense_bf16 = weight.to_quantized().dequantize(torch.bfloat16).to(device)
    dense_fp32 = dense_bf16.float() if device == "cpu" else None
    int4_op = torch_int4_op(weight, device)
    modules = {b: QuantLinear(weight, get_backend(b, device)) for b in backends}
    results = []
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        row = {"shape": name, "N": n, "K": k, "M": m,
               "bf16_s": timed(lambda: torch.matmul(x, dense_bf16.T), device)}
        if dense_fp32 is not None:
            x32 = x.float()
            row["fp32_s"] = timed(lambda: torch.matmul(x32, dense_fp32.T), device)
        if int4_op is not None:
            row["torch_int4_s"] = timed(lambda: int4_op(x), device)
        row.update(gemm_or_dequantize_matmul(x, weight, device))
        for backend, module in modules.items():
            seconds = timed(lambda: module(x), device)
            moved = weight.nbytes() + x.numel() * 2 + m * n * 2
            row[backend] = {"s": seconds, "GB/s": moved / seconds / 1e9, "copy_%": 100 * moved / seconds / copy_bw,
                            "vs_bf16": row["bf16_s"] / seconds}
            if "fp32_s" in row:
                row[backend]["vs_fp32"] = row["fp32_s"] / seconds
            if "torch_int4_s" in row:
                row[backend]["vs_torch_int4"] = row["torch_int4_s"] / seconds
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def gemm_or_dequantize_matmul(x: torch.Tensor, weight: Int4Weight, device: str) -> dict:
    """On a GPU with Triton, past the GEMV's rows: the tiled GEMM alone and the weight
    dequantized in one pass + bf16 matmul (cuBLAS), the two paths DEQUANTIZE_MATMUL_MIN_ROWS
    chooses between, timed here whatever it is set to."""
    if device != "cuda" or not triton_usable(torch.device(device)):
        return {}
    from maverick_quant.compress.kernels import triton_w4

    if x.shape[0] <= triton_w4.GEMV_MAX_ROWS:
        return {}
    return {"triton_gemm_s": timed(lambda: triton_w4.w4_gemm(x, weight), device),
            "dequantize_matmul_s": timed(lambda: torch.nn.functional.linear(x, triton_w4.w4_dequantize(weight, x.dtype)),
                                         device)}


def sweep_gemv(shapes: list[str], device: str) -> list[dict]:
    """The Triton GEMV at M = 1 on each shape under every tiling of `triton_sm90.gemv_tilings`
    (each compiled for sm_90 without spilling in test_kernels_sm90), split-K aiming at 4, 8 or 16
    programs per SM: the best against the default (`triton_w4.DEFAULT_GEMV`)."""
    from maverick_quant.compress.kernels import triton_w4
    from maverick_quant.triton_sm90 import gemv_tilings

    rows = []
    for name in shapes:
        n, k = SHAPES[name]
        weight = random_weight(n, k, device)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        times = {config: timed(lambda: triton_w4.gemv_launch(x, weight, config=config).run(), device)
                 for config in gemv_tilings(programs_per_sm=(4, 8, 16))}
        best = min(times, key=times.get)
        row = {"shape": name, "default_us": times[triton_w4.DEFAULT_GEMV] * 1e6, "best_us": times[best] * 1e6,
               "best": dataclasses.asdict(best), "GB/s_best": weight.nbytes() / times[best] / 1e9}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def crossovers(rows: list[dict]) -> dict[str, int | None]:
    """Per shape, the fewest rows M at which dequantize + matmul beat the tiled GEMM, when
    they beat it there and at every larger M measured (None: never)."""
    found: dict[str, int | None] = {}
    for name in dict.fromkeys(row["shape"] for row in rows if "triton_gemm_s" in row):
        timings = sorted((row["M"], row["dequantize_matmul_s"] < row["triton_gemm_s"])
                         for row in rows if row["shape"] == name and "triton_gemm_s" in row)
        wins_from = [m for i, (m, _) in enumerate(timings) if all(win for _, win in timings[i:])]
        found[name] = wins_from[0] if wins_from else None
    return found


class SharedExpert(torch.nn.Module):
    """Llama 4's shared expert with gate and up fused: down(silu(gate) * up)."""

    def __init__(self, gate_up: QuantLinear, down: QuantLinear):
        super().__init__()
        self.gate_up, self.down = gate_up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


def bench_moe_layer(backends: list[str], experts: int, device: str) -> list[dict]:
    """Router (bf16) + shared expert + top-1 routed expert of one Maverick MoE layer at M = 1."""
    gate_up = random_weight(2 * EXPERT_INTER, HIDDEN, device, experts)
    down = random_weight(HIDDEN, EXPERT_INTER, device, experts)
    router = torch.randn(experts, HIDDEN, device=device, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, HIDDEN, device=device, dtype=torch.bfloat16)
    rows = []
    for backend_name in backends:
        backend = get_backend(backend_name, device)
        shared = SharedExpert(QuantLinear(random_weight(2 * EXPERT_INTER, HIDDEN, device), backend),
                              QuantLinear(random_weight(HIDDEN, EXPERT_INTER, device), backend))
        block = QuantMoE(router, shared, gate_up, down, 1, "silu", backend)
        seconds = timed(lambda: block(x), device)
        row = {"shape": f"MoE layer (shared + top-1 of {experts})", "M": 1, backend_name: {"s": seconds, "us": seconds * 1e6}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--backends", nargs="*", default=["cuda", "triton"] if gpu else ["cpu-int4"])
    parser.add_argument("--m", nargs="*", type=int, default=[1, 16, 64, 128, 256, 1024] if gpu else [1, 16, 64, 128])
    parser.add_argument("--experts", type=int, default=128 if gpu else 8)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--json", help="Also write every row here.")
    parser.add_argument("--sweep-gemv", action="store_true",
                        help="Only time the Triton GEMV's tilings at M = 1 (GPU): the best per shape against the default.")
    args = parser.parse_args()
    device = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    if args.sweep_gemv:
        if not gpu:
            parser.error("--sweep-gemv times the Triton GEMV on a GPU; this machine has none")
        rows = sweep_gemv(args.shapes, device)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"device": torch.cuda.get_device_name(), "gemv_sweep": rows}, handle, indent=1)
        return
    copy_bw = copy_bandwidth(device)
    what = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# device: {what}; copy bandwidth {copy_bw / 1e9:.1f} GB/s; torch {torch.__version__}", flush=True)
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        rows += bench_linear(name, n, k, args.m, args.backends, device, copy_bw)
    rows += bench_moe_layer(args.backends, args.experts, device)
    print_table(rows, args.backends)
    crossover = crossovers(rows)
    if crossover:
        from maverick_quant.compress.kernels.triton_w4 import DEQUANTIZE_MATMUL_MIN_ROWS

        print(f"\nDequantize + matmul beats the tiled GEMM from M = (per shape): {crossover}; "
              f"DEQUANTIZE_MATMUL_MIN_ROWS is {DEQUANTIZE_MATMUL_MIN_ROWS}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": what, "copy_GBps": copy_bw / 1e9, "rows": rows, "dequantize_crossover": crossover},
                      handle, indent=1)


def print_table(rows: list[dict], backends: list[str]) -> None:
    print("\n| shape | M | backend | time µs | GB/s | % of copy | vs bf16 | vs fp32 | vs torch int4 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for backend in backends:
            result = row.get(backend)
            if result is None:
                continue
            cells = [f"{result['s'] * 1e6:.0f}", f"{result.get('GB/s', 0):.1f}" if "GB/s" in result else "",
                     f"{result['copy_%']:.0f}%" if "copy_%" in result else ""]
            cells += [f"{result[key]:.2f}x" if key in result else "" for key in ("vs_bf16", "vs_fp32", "vs_torch_int4")]
            print(f"| {row['shape']} | {row['M']} | {backend} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
