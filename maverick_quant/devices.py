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
    if isinstance(name, str) and name != "auto":
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError, TypeError):
            device = None
        if device is not None and (device.type == "cuda" or (device.type == "cpu" and device.index is None)):
            return name
    if name == "auto":
        return name
    raise InputError(f"{option}={name!r}: expected {DEVICE_CHOICES}")


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """The torch device `name` stands for: "auto" is CUDA when this machine has it, else the
    CPU; "cuda" under torchrun is this process's GPU (LOCAL_RANK). InputError naming `option`
    for a device this machine does not have."""
    check_device_name(name, option)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise InputError(f"{option}={name!r}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
    index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise InputError(f"{option}={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


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
