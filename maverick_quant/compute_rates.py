"""How fast this machine computes what a quantize run computes: the compute part of `plan`'s time.

Measured on the device the run will use and cached per device, thread count and cost-model
version: fp32 matmul flops per second; GPTQ's cost model
t(N, K) = K * column_seconds + gptq_flops(N, K) / gptq_flops_per_s fitted to two real solves;
and the seconds per weight that the range search (`clip_search`) adds, by one solve timed
with and without it.
The disk part (reads, writes, hashes) is `disk.py`.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from pathlib import Path

import torch

from maverick_quant.outputs import write_json_atomic
from maverick_quant.sources import cache_dir, read_cached


COST_MODEL = 6  # bump when the rates measured change: cached rates of another model are not reused


def _timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes on `device` (waiting for the GPU to finish)."""
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - started


def _gptq_seconds(rows: int, cols: int, device: torch.device, clip_search: bool = False) -> float:
    """Best of two timed GPTQ solves of a random [rows, cols] weight on `device` (after a warm-up),
    with each group's range searched when `clip_search`."""
    from maverick_quant.compress.gptq import gptq_quantize
    from maverick_quant.recipe import QuantSpec

    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(rows, cols, generator=generator), torch.randn(4 * cols, cols, generator=generator)
    spec = QuantSpec(bits=4, group_size=128, clip_search=clip_search)
    weight, hessian = weight.to(device), (x.T @ x / x.shape[0]).to(device)
    gptq_quantize(weight[:16], hessian, spec)
    return min(_timed(lambda: gptq_quantize(weight, hessian, spec), device) for _ in range(2))


def dequantize_seconds_per_weight(rows: int = 2048, cols: int = 2048) -> float:
    """Seconds per weight to read a 4-bit g128 weight as a bundle stores it back to fp32 on the
    host (unpack the codes, then (q - z) s), as `validate` does with a bundle candidate's
    weights when its layers run on the CPU: best of three."""
    from maverick_quant.bundle import decode_quantized, encode_quantized
    from maverick_quant.compress.grid import rtn_quantize
    from maverick_quant.recipe import QuantSpec

    stored = encode_quantized("w", rtn_quantize(torch.randn(rows, cols), QuantSpec(bits=4, group_size=128)))
    decode = lambda: decode_quantized("w", stored, [rows, cols], 4, 128).dequantize()  # noqa: E731
    decode()
    return min(_timed(decode, torch.device("cpu")) for _ in range(3)) / (rows * cols)


def round_seconds_per_weight(device: torch.device, rows: int = 4096, cols: int = 4096) -> float:
    """Seconds per weight to quantize a [rows, cols] weight to nearest (`rtn_quantize`, g128:
    grid, codes, packing), as `--method rtn`, AWQ's final rounding and `rtn` experts do on
    `device`: best of three. 64 MB of fp32, larger than the caches as a real weight is (a
    2048 x 1024 probe ran 3-5x faster here than Maverick-sized weights)."""
    from maverick_quant.compress.grid import rtn_quantize
    from maverick_quant.recipe import QuantSpec

    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(device)
    spec = QuantSpec(bits=4, group_size=128)
    rtn_quantize(weight, spec)
    return min(_timed(lambda: rtn_quantize(weight, spec), device) for _ in range(3)) / weight.numel()


def rtn_seconds_per_weight(device: torch.device, rows: int = 2048, cols: int = 1024) -> float:
    """Seconds per weight to round CANDIDATES_AT_ONCE scaled candidates of a [rows, cols] weight
    to nearest and back (`compress.awq.scaled_quantized`, g128), as AWQ's searches do on
    `device`: best of three."""
    from maverick_quant.compress.awq import CANDIDATES_AT_ONCE, scaled_quantized
    from maverick_quant.recipe import QuantSpec

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=generator).to(device)
    scales = (torch.rand(CANDIDATES_AT_ONCE, cols, generator=generator) + 0.5).to(device)
    spec = QuantSpec(bits=4, group_size=128)
    scaled_quantized(weight, scales, spec)
    return min(_timed(lambda: scaled_quantized(weight, scales, spec), device) for _ in range(3)) / weight.numel() / len(scales)


def gptq_flops(rows: int, cols: int) -> float:
    """Floating-point work of one GPTQ solve: the column updates 2 N K^2 and the factorisation K^3."""
    return 2 * rows * cols**2 + cols**3


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else the platform's processor string)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rates_cache(device: torch.device | str = "cpu") -> Path:
    """Where this machine's measured rates on `device` are kept: per cost-model version, device
    (the CPU's model and thread count, or the GPU's name) and torch version, so a cache in a home
    folder shared by other machines, or kept across a torch upgrade, is not taken for this one's."""
    device = torch.device(device)
    where = f"{cpu_model()}-{torch.get_num_threads()}" if device.type == "cpu" else torch.cuda.get_device_name(device)
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", f"{where}-torch{torch.__version__}")
    return cache_dir() / f"plan-rates-v{COST_MODEL}-{device.type}-{slug}.json"


RATE_KEYS = ("matmul_flops_per_s", "gptq_flops_per_s", "gptq_column_seconds", "clip_search_seconds_per_weight",
             "dequantize_seconds_per_weight", "rtn_seconds_per_weight", "round_seconds_per_weight", "threads", "model",
             "device", "measured_at", "load_per_core")
BUSY_LOAD_PER_CORE = 0.5  # a 1-minute load average per core above this: other work shares the cores


def load_per_core() -> float | None:
    """The 1-minute load average per core: the other work sharing the cores (None where unknown)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return None


def measured_busy(rates: dict) -> bool:
    """Whether `rates` were measured while other work shared the cores (then slower than the
    machine is: the range search's rate came out 13x slower here at a load of 3.5 per core)."""
    return (rates.get("load_per_core") or 0.0) > BUSY_LOAD_PER_CORE


def _usable(cached: dict | None, remeasure: bool) -> bool:
    """A cache is used unless asked to measure again, of another cost model, or measured while
    the machine was busy and it is idle now (then the measurement is replaced)."""
    if cached is None or remeasure or cached["model"] != COST_MODEL:
        return False
    return not measured_busy(cached) or (load_per_core() or 0.0) > BUSY_LOAD_PER_CORE


def machine_rates(cache: Path | None = None, device: torch.device | str = "cpu", remeasure: bool = False) -> dict:
    """Measured on this machine's `device` (cached in `cache`): fp32 matmul flops/s, and GPTQ's
    cost model t(N, K) = K * column_seconds + gptq_flops(N, K) / gptq_flops_per_s fitted to two
    real solves (a small one, where the per-column overhead dominates, and a larger one); and
    what `clip_search` adds per weight, the larger solve timed with and without it; and the
    host's seconds per weight to dequantize a bundle's weight (validate's candidate); and the
    device's seconds per weight to round AWQ's scale candidates to nearest and to quantize a
    weight to nearest. Each measurement records when, and the load it ran under."""
    cached = read_cached(cache, RATE_KEYS)
    if _usable(cached, remeasure):
        return cached
    load = load_per_core()  # before our own timed work adds to it
    device = torch.device(device)
    size = 1024 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device)
    a @ a
    repeats = 8
    matmul = repeats * 2 * size**3 / min(_timed(lambda: [a @ a for _ in range(repeats)], device) for _ in range(3))
    small, large = (512, 256), (2048, 1024)
    t_small, t_large = _gptq_seconds(*small, device), _gptq_seconds(*large, device)
    # solve t = K c + F / r for (c, 1/r) from the two measurements
    (k1, f1), (k2, f2) = (small[1], gptq_flops(*small)), (large[1], gptq_flops(*large))
    inverse_rate = max((t_large * k1 - t_small * k2) / (f2 * k1 - f1 * k2), 1 / matmul)
    column = max((t_small - f1 * inverse_rate) / k1, 0.0)
    clip = max(_gptq_seconds(*large, device, clip_search=True) - t_large, 0.0) / (large[0] * large[1])
    rates = {"matmul_flops_per_s": matmul, "gptq_flops_per_s": 1 / inverse_rate, "gptq_column_seconds": column,
             "clip_search_seconds_per_weight": clip, "dequantize_seconds_per_weight": dequantize_seconds_per_weight(),
             "rtn_seconds_per_weight": rtn_seconds_per_weight(device), "round_seconds_per_weight": round_seconds_per_weight(device),
             "threads": torch.get_num_threads(), "model": COST_MODEL, "load_per_core": load,
             "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, rates)
    return rates
