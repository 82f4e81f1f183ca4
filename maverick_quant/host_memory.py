"""This process's host memory: its peak, and handing freed heap pages back to the OS.

glibc serves allocations below its mmap threshold (which rises to 32 MiB as large blocks are
freed) from the heap. A loop that allocates and frees tensors of 1-32 MiB beside small
long-lived objects leaves the heap full of free holes that stay resident: validation's scoring
loop grew a tiny model's RSS from 0.6 to 2.8 GiB over 64 windows (a measurement that varied
from run to run with thread scheduling). `release_free_memory` after each step returns those
pages; a fixed lower mmap threshold would too, but made quantize 19-24% slower.
"""

from __future__ import annotations

import ctypes
import functools
import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    Reads VmHWM (the high-water mark of this process image) from /proc: `ru_maxrss` is not
    reset by exec, so a process started from a large parent would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CGROUP_LIMITS = (  # (limit, usage, stat file, its inactive page cache key) of this process's memory cgroup: v2, v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)


def available_bytes(meminfo: str = "/proc/meminfo", cgroups=CGROUP_LIMITS) -> int | None:
    """Bytes a new allocation can take: the smaller of the kernel's MemAvailable and what this
    process's memory cgroup still allows, its limit minus its working set (usage less the
    inactive page cache the kernel reclaims first, as docker and the kubelet count it: a
    container that streamed its model's shards holds them as cache). A container's limit is not
    in MemAvailable, which counts the whole host. Only the cgroup namespace's root is read.
    None where neither can be read."""
    found = []
    try:
        found += [int(line.split()[1]) * 1024 for line in Path(meminfo).read_text().splitlines()
                  if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    for limit_path, usage_path, stat_path, cache_key in cgroups:
        try:
            limit, usage = Path(limit_path).read_text().strip(), int(Path(usage_path).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" (v2) or a huge number (v1): no limit
            found.append(max(int(limit) - usage + _stat_value(stat_path, cache_key), 0))
        break
    return min(found) if found else None


def _stat_value(path: str, key: str) -> int:
    """`key`'s value in a cgroup memory.stat file (0 where unreadable)."""
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`), so that transient
    buffers of one layer (or the tokenizer's) do not stay resident for the whole run."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, loaded once (None where the C library is not glibc)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
