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
