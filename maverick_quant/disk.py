"""How fast this machine reads, writes and hashes files: the disk part of `plan`'s time.

A quantize run reads every checkpoint byte once, writes the bundle and, after every layer,
the calibration hidden states [S, L, D] (fp32) for `--resume` (every write flushed to the
disk), and takes the sha256 of each bundle file once, when written. For Maverick at
512 x 2048 tokens this is 0.8 TB read, 1.2 TB written and 0.2 TB hashed, the
same order as the compute on a GPU, so the plan counts it:

    seconds = read_bytes / read_rate + write_bytes / write_rate + hashed_bytes / hash_rate

Rates are measured, never assumed (the median of `PROBES` tries, since a virtual disk's rate
varies from one write to the next): write = `PROBE_BYTES` written and fsync'ed in the folder
the run will write to; read = the same bytes read back after asking the kernel to drop them
from the page cache (posix_fadvise DONTNEED; a file system that ignores it, such as tmpfs,
reads from memory, which is then its true rate), or the first `PROBE_BYTES` of the model's
largest shard when a model directory is given; hash = sha256 over `PROBE_BYTES` in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from maverick_quant.outputs import write_json_atomic
from maverick_quant.sources import read_cached

PROBE_BYTES = 64 * 2**20
PROBES = 3
BLOCK = 4 * 2**20


@dataclass(frozen=True)
class DiskRates:
    """Bytes per second: sequential write (fsync'ed), uncached read, sha256."""

    write: float
    read: float
    hash: float
    where: str  # the folder written to (and the file read, if any), for the plan's assumptions

    def __post_init__(self) -> None:
        if min(self.write, self.read, self.hash) <= 0:
            raise ValueError(f"disk rates must be positive: {self}")

    def seconds(self, read_bytes: int, write_bytes: int, hashed_bytes: int) -> dict[str, float]:
        """{"read", "write", "hash"}: seconds of each kind of disk work."""
        return {"read": read_bytes / self.read, "write": write_bytes / self.write, "hash": hashed_bytes / self.hash}


def hash_rate(size: int = PROBE_BYTES) -> float:
    """sha256 bytes per second on this CPU (the digest is content-independent in speed)."""
    data = bytes(size)
    started = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return size / max(time.perf_counter() - started, 1e-9)


def _drop_cached(fd: int, size: int) -> None:
    """Ask the kernel to forget the first `size` bytes of `fd` from the page cache."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)


def _read_seconds(fd: int, size: int) -> tuple[int, float]:
    """(bytes read, seconds) for the first `size` bytes of `fd`, read after dropping them from the cache."""
    _drop_cached(fd, size)
    os.lseek(fd, 0, os.SEEK_SET)
    buffer, done = bytearray(BLOCK), 0
    started = time.perf_counter()
    with open(fd, "rb", buffering=0, closefd=False) as stream:
        while done < size:
            count = stream.readinto(memoryview(buffer)[: min(BLOCK, size - done)])
            if not count:
                break
            done += count
    return done, time.perf_counter() - started


def write_read_rates(folder: Path, size: int = PROBE_BYTES) -> tuple[float, float]:
    """(write, read) bytes per second of a probe file in `folder`, removed afterwards."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".maverick-quant-disk-probe-")
    try:
        block, written = os.urandom(BLOCK), 0
        started = time.perf_counter()
        while written < size:
            written += os.write(fd, block)
        os.fsync(fd)
        write = written / max(time.perf_counter() - started, 1e-9)
        done, seconds = _read_seconds(fd, written)
        return write, done / max(seconds, 1e-9)
    finally:
        os.close(fd)
        os.unlink(name)


def file_read_rate(path: Path, size: int = PROBE_BYTES) -> float:
    """Uncached read bytes per second of the first `size` bytes of an existing file (read only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done, seconds = _read_seconds(fd, min(size, os.fstat(fd).st_size))
        return done / max(seconds, 1e-9)
    finally:
        os.close(fd)


def measure_disk(folder: Path, model_dir: Path | None = None, cache_dir: Path | None = None,
                 remeasure: bool = False) -> DiskRates:
    """The disk rates for a run writing to `folder` and reading `model_dir`'s shards (None:
    reads as fast as `folder`), cached per (host, folder's device, model's device) in
    `cache_dir` (the host too: device numbers repeat across machines sharing a home folder);
    `remeasure`: measured again whatever the cache holds."""
    folder = Path(folder)
    shards = sorted(Path(model_dir).glob("*.safetensors"), key=lambda p: p.stat().st_size) if model_dir else []
    shards = [shard for shard in shards if shard.stat().st_size >= PROBE_BYTES]  # big enough to time
    host = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname())
    key = f"{host}-{folder.stat().st_dev}-{shards[-1].stat().st_dev if shards else 'same'}"
    cache = Path(cache_dir) / f"plan-disk-v1-{key}.json" if cache_dir is not None else None
    cached = read_cached(cache, ("write", "read", "hash"))
    if cached is not None and not remeasure and min(cached["write"], cached["read"], cached["hash"]) > 0:  # measured once per pair of disks
        return DiskRates(cached["write"], cached["read"], cached["hash"], f"measured earlier, kept in {cache}")
    tries = [write_read_rates(folder) for _ in range(PROBES)]
    write, read = statistics.median(t[0] for t in tries), statistics.median(t[1] for t in tries)
    where = f"writes in {folder.resolve()}"
    if shards:
        read, where = statistics.median(file_read_rate(shards[-1]) for _ in range(PROBES)), f"{where}, reads of {shards[-1]}"
    rates = DiskRates(write, read, hash_rate(), where)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, asdict(rates))
    return rates
