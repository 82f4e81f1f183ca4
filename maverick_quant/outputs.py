"""Writing outputs so that nothing is lost or half-written: checks before any work (an
existing output needs --force; an output apart from every input), temporary names renamed
into place durably (data, then the directory entry, flushed), and sharded safetensors.

`atomic_output_dir` gives a temporary sibling directory that replaces the target only on
success; `write_json_atomic` / `save_safetensors_atomic` write one file so; `ShardedWriter`
writes safetensors shards with an index.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
from maverick_quant.checkpoint import INDEX_NAME, SINGLE_NAME
from maverick_quant.errors import InputError

def check_output_dir(out: Path, force: bool, replaced_whole: bool = True, is_file: bool = False) -> None:
    """Refuse to overwrite an existing output unless forced, and, for an output `replaced_whole`
    when the work ends (all but `run`'s folder, whose steps are replaced inside it), a path that
    names no file or folder of its own ("", ".", ".."). Even forced, an output folder replaces
    only a folder and an output file (`is_file`) only a regular file: --force over a user's file,
    or a device such as /dev/null, replaced it. Checked before any work starts."""
    out = Path(out)
    if replaced_whole and out.name in ("", ".", ".."):
        raise InputError(f"{str(out) or repr('')}: an output must name a new file or folder (it is replaced as a "
                         "whole), not the working folder or one above it")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise InputError(f"{out}: output already exists; pass --force to replace it")
    if (out.is_file() if is_file else out.is_dir()) is False:
        raise InputError(f"{out}: exists and is not {'a regular file' if is_file else 'a folder'} (a "
                         f"{'folder, device or broken link' if is_file else 'file, device or broken link'}); --force "
                         f"replaces only an earlier output {'file' if is_file else 'folder'}: remove it or write elsewhere")


def check_output_apart(out: Path, inputs: dict[str, Path | str | None], option: str = "--out") -> None:
    """InputError when the output `out` is one of `inputs` ({option or argument: path}), a
    folder holding one, or inside an input folder: a finished run replaces `out` (with --force),
    which would delete that input, and a new file or folder inside an input changes it (a
    bundle or export whose manifest lists its files then fails `inspect`; a model folder may be
    a read-only cache snapshot). Checked before any work."""
    target = Path(out).resolve()
    for name, path in inputs.items():
        if path is None or str(path) == "self":
            continue
        for source in _resolved_parts(Path(path)):
            if source == target or target in source.parents:
                raise InputError(f"{option} {out}: it is, or holds, the input {name} {path}, which finishing the run "
                                 f"would replace; write the output elsewhere")
            if source in target.parents:
                raise InputError(f"{option} {out}: it is inside the input {name} {path}; writing there would change "
                                 f"that input (a bundle's or export's manifest no longer matches its folder); write "
                                 f"the output elsewhere")


def _resolved_parts(path: Path) -> list[Path]:
    """`path` resolved, and for a folder the resolved targets of the links in it (a Hugging Face
    cache snapshot's shards live in ../../blobs)."""
    parts = [path.resolve()]
    if path.is_dir():
        parts += [child.resolve() for child in path.iterdir() if child.is_symlink()]
    return parts


def partial_name(out: Path) -> Path:
    """The temporary name `.NAME.partial-PID` an output is written under before its rename
    (leftovers of earlier runs are named first: `warn_leftovers`)."""
    out = Path(out)
    mine = out.with_name(f".{out.name}.partial-{os.getpid()}")
    warn_leftovers(out, mine)
    return mine


def warn_leftovers(out: Path, mine: Path | None = None) -> None:
    """Name in a warning, with their size, the leftovers of earlier runs of `out` that were
    killed: their `.NAME.partial-PID`, or an `.NAME.old-PID` that `replace_dir` moved aside.
    Nothing removes them, as a run on another host of a shared file system may still own one
    (and may rename or remove its files while they are counted)."""
    out = Path(out)
    leftovers = [p for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*") for p in out.parent.glob(pattern)
                 if p != mine]
    if not leftovers:
        return
    size = 0
    for path in leftovers:
        for entry in [path] if not path.is_dir() else path.rglob("*"):
            try:
                size += entry.stat().st_size if entry.is_file() else 0
            except FileNotFoundError:  # renamed or removed by the run that owns it
                pass
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    warnings.warn(f"{len(leftovers)} leftovers of earlier runs of {out.name} that were stopped hold {shown}: "
                  f"{', '.join(p.name for p in leftovers[:3])} in {out.parent}; remove them if no run still "
                  "writes them", stacklevel=3)


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes `out` only if the block succeeds.

    On any exception the temporary directory is removed, so no half-written output is left;
    an existing `out` is replaced (only with force=True) after the new one is complete.
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(finished: Path, out: Path) -> None:
    """Rename the finished directory to `out`; an existing `out` is moved aside first and
    removed only after the rename is on the disk (the parent flushed), so a crash or a power loss
    never leaves neither."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(finished, out)
        _fsync_directory(out.parent)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:  # a file (or link) the output replaced with --force
            old.unlink(missing_ok=True)
    else:
        os.replace(finished, out)
        _fsync_directory(out.parent)  # before the caller removes the state that could redo it


def durable_replace(tmp: Path, path: Path) -> None:
    """Rename the finished file `tmp` over `path` so that it survives a power loss: its data
    is flushed to the disk first (fsync), and the directory entry after the rename. Without
    the first fsync a file system may persist the rename before the data, leaving `path`
    empty or zero-filled after a crash, which a resumed run would take as finished."""
    _give_default_mode(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_directory(path.parent)


@functools.cache
def _umask() -> int:
    """The process's umask, read once: from /proc/self/status on Linux, else by setting it and
    back (which, for that instant, would give a file another thread creates the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_default_mode(path: Path) -> None:
    """Give the finished file `path` the mode a plain `open` would: 0o666 less the umask.
    safetensors' writer and mkstemp create files 0o600, so published shards and reports were
    unreadable to the other users of a shared volume or web server."""
    wanted = 0o666 & ~_umask()
    if path.stat().st_mode & 0o777 != wanted:
        os.chmod(path, wanted)


def durable_replace_dir(tmp: Path, path: Path) -> None:
    """`durable_replace` for a finished directory `tmp`: every file and directory under it
    (deepest first) and `tmp` itself are flushed before it is renamed to `path`, and the parent after."""
    for entry in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        (_fsync_directory if entry.is_dir() else _fsync_file)(entry)
    _fsync_directory(tmp)
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


def _fsync_directory(path: Path) -> None:
    """Flush a directory's entries (renames into it) to the disk."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    except OSError as exc:  # some network and FUSE file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(directory)


def temporary_name(path: Path) -> Path:
    """The name an atomic write of `path` writes first: `.NAME.tmp` beside it."""
    return path.with_name(f".{path.name}.tmp")


def is_temporary(path: Path) -> bool:
    """Whether `path` is an atomic write's temporary file (`temporary_name`), which a killed
    write leaves behind and no finished output may list."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary name in the same directory (made if missing), then rename
    over `path` (durably)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.write_text(text, encoding="utf-8")
    durable_replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    """`data` as indented, key-sorted JSON, written as `write_text_atomic` does."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
"""errno values of an output the machine cannot write (a full disk or quota, a file-size limit, a
read-only or forbidden folder, a failing device): exit 2 naming the file, not a traceback."""


def io_failure(exc: OSError) -> str:
    """A failed read or write as "FILE: CAUSE" ("the disk is full" for ENOSPC)."""
    cause = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
    return f"{exc.filename or 'writing the output'}: {cause}"


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def _as_os_error(exc: Exception, path: Path) -> OSError | None:
    """The OSError inside a SafetensorError, naming `path` (safetensors' writer reports a full
    disk as "I/O error: No space left on device (os error 28)", not as an OSError), or None
    when it is no I/O error."""
    found = _OS_ERROR_CODE.search(str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


KILL_DURING_WRITE = "MAVERICK_QUANT_KILL_DURING_WRITE"  # fault injection for the resume tests
_atomic_writes = 0


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors.save_file to a temporary name, then rename (a crash never leaves half a file,
    and a finished one survives a power loss: `durable_replace`).

    Fault injection: with MAVERICK_QUANT_KILL_DURING_WRITE=N in the environment, the process
    SIGKILLs itself during its N-th such write, leaving half a temporary file behind (the
    resume tests use it to crash in the middle of a write deterministically)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    global _atomic_writes
    tmp = temporary_name(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or {"format": "pt"})
    except SafetensorError as exc:
        tmp.unlink(missing_ok=True)
        failure = _as_os_error(exc, path)
        if failure is None:
            raise
        raise failure from exc
    _atomic_writes += 1
    if os.environ.get(KILL_DURING_WRITE) == str(_atomic_writes):
        os.truncate(tmp, tmp.stat().st_size // 2)
        os.kill(os.getpid(), 9)
    durable_replace(tmp, path)


class ShardedWriter:
    """Writes groups of tensors into safetensors shards of at most `max_shard_bytes`.

    A group (one module's tensors) is never split across shards. `close()` writes
    model.safetensors.index.json (or a single model.safetensors when one shard sufficed).
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 10**9):
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending.update(tensors)
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_safetensors_atomic(self.pending, self.out_dir / name)
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush and write the index; returns the shard file names."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self.out_dir / self.shards[0][0], self.out_dir / SINGLE_NAME)
            return [SINGLE_NAME]
        final = []
        weight_map = {}
        for i, (name, keys) in enumerate(self.shards, start=1):
            final_name = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(self.out_dir / name, self.out_dir / final_name)
            final.append(final_name)
            weight_map.update({key: final_name for key in keys})
        write_json_atomic(self.out_dir / INDEX_NAME, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return final
