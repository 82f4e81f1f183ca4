"""The compute device of a run.

A layer, its statistics (Hessians, AWQ samples), the MoE block's input and output caches,
a chunk of experts and every solve live on the compute device; the hidden-state cache of
all calibration windows [S, L, D] stays in host memory and reaches the device one batch of
windows at a time. Results are brought back to the host before they are written.
"""

from __future__ import annotations

import os

import torch

from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.errors import InputError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def check_device_name(name: object, option: str = "--device") -> str:
    """`name` if it names a device this tool runs on (auto, cpu, cuda, cuda:N), whether or not
    this machine has it (a recipe or a plan may be for another machine); else InputError."""
    if name == "auto":
        return name
    try:
        device = torch.device(name) if isinstance(name, str) else None
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is not None and (device.type == "cuda" or (device.type == "cpu" and device.index is None)):
        return name
    raise InputError(f"{option}={name!r}: expected {DEVICE_CHOICES}")


def device_kind(name: str, option: str = "--device") -> str:
    """"cpu" or "cuda": the kind of device `name` stands for here ("auto": CUDA when present)."""
    check_device_name(name, option)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """The torch device `name` stands for: "auto" is CUDA when this machine has it, else the
    CPU; plain "cuda" under torchrun is this process's GPU (LOCAL_RANK, modulo the GPUs this
    process sees). InputError naming `option` for a device this machine does not have."""
    if device_kind(name, option) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"{option}={name!r}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
    device, count = torch.device("cuda" if name == "auto" else name), torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if count > 1 and local_rank >= count:  # one visible GPU per process (CUDA_VISIBLE_DEVICES) is fine
        raise InputError(f"{option}={name!r}: process LOCAL_RANK={local_rank} has no GPU of its own on this "
                         f"machine's {count}; start at most {count} processes per host")
    own = local_rank % count
    if device.index is not None and device.index != own and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(f"{option}={name!r} under torchrun puts every process on that GPU; pass cuda (each "
                         f"process takes GPU LOCAL_RANK, here cuda:{own})")
    index = own if device.index is None else device.index
    if index >= count:
        raise InputError(f"{option}={name!r}: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


KERNEL_DEVICES = {"cpu-int4": "cpu", "cuda": "cuda"}  # kernel backends that run on one kind of device only


def check_kernels_device(kernels: str | None, device: torch.device) -> None:
    """InputError when kernel backend `kernels` cannot run on `device` (triton runs on CUDA, or
    anywhere under TRITON_INTERPRET=1; reference and auto run anywhere), or cannot run on this
    machine at all (the CUDA backend without nvcc or failing to build, Triton not installed,
    the int4 CPU op missing from this torch): found before any work, not at the validation step
    after hours of quantizing. Building the CUDA extension here costs nothing later (cached)."""
    from maverick_quant.runtime import backend_named

    kind = KERNEL_DEVICES.get(kernels)
    if kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        kind = "cuda"
    if kind is not None and kind != device.type:
        raise InputError(f"--kernels {kernels} runs on {kind}, and --device is {device}: pass --device {kind} "
                         f"(or --kernels auto)")
    if kernels not in (None, "auto", "reference"):  # auto falls back to what runs; reference runs anywhere
        backend_named(kernels, device)


def use_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (kernels and synchronizations that do not
    name a device use it); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def device_label(device: torch.device) -> str:
    """What a device computes like (resumed work is compared by it): the GPU's model name, or
    the CPU's with this process's thread count, on which BLAS reductions round ("cpu AMD EPYC
    7B13 (2 threads)"); a CPU whose model cannot be read is "cpu (N threads)"."""
    if device.type != "cpu":
        return torch.cuda.get_device_name(device)
    model = _cpu_model()
    return f"cpu {model} ({torch.get_num_threads()} threads)" if model else f"cpu ({torch.get_num_threads()} threads)"


def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where unreadable)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        return None
    return None


def quantized_to(quantized: dict[str, QuantizedWeight], device: torch.device | str) -> dict[str, QuantizedWeight]:
    """The same quantized weights with every tensor on `device` (no copy where already there)."""
    return {name: weight.map_tensors(lambda t: t.to(device)) for name, weight in quantized.items()}


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the device's peak allocation from now (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_mib(device: torch.device) -> float | None:
    """Peak bytes torch allocated on `device` since `reset_peak_memory`, MiB; None on the CPU
    (whose peak is the process's RSS)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
