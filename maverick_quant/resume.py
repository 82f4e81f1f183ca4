"""Resumable quantize runs: a fixed work directory, a fingerprint, and per-layer progress.

A run writes into `.NAME.partial` beside its output `NAME` and renames it to `NAME` only when
the bundle is complete. Inside it:

    run.json                         what the run is computing: source model fingerprint, the
                                     quantize spec, the calibration tokens' sha256, tool version
    layers/layer-NNNNN.*             finished layers (each file written atomically)
    resume/hidden.safetensors        the calibration hidden states entering `next_layer`
    resume/progress.json             {"next_layer": i, "hidden_sha256": ...}, written after
                                     the hidden states, so it never points at a half-written file

After a crash (SIGKILL, power loss, disk full) `--resume` checks run.json against the new
invocation (a mismatch is refused, naming what changed), loads the hidden states and goes
on at `next_layer`. Every computation is deterministic for a given machine and thread
count, so the resumed bundle's tensor files are byte-identical to an uninterrupted run's.
A lock file beside the work directory keeps two runs from writing it at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch

from maverick_quant import __version__
from maverick_quant.checkpoint import (check_output_dir, replace_dir, save_safetensors_atomic, sha256_file,
                                       write_json_atomic)
from maverick_quant.errors import InputError

RUN_FILE = "run.json"
RESUME_DIR = "resume"
HIDDEN_FILE = "hidden.safetensors"
PROGRESS_FILE = "progress.json"


def work_dir_for(out: Path) -> Path:
    """The fixed work directory of output `out`: `.NAME.partial` beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_identity(source_fingerprint: str, spec: dict, calibration_ids: torch.Tensor | None) -> dict:
    """What a run computes; a resumed run must match it exactly."""
    return {"source_fingerprint": source_fingerprint, "quantize": spec, "tool_version": __version__,
            "calibration_sha256": None if calibration_ids is None else tensor_sha256(calibration_ids)}


def identity_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two identities, with both values for leaves."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += identity_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            shown = (lambda v: v if not isinstance(v, str) or len(v) < 20 else v[:12] + "...")  # noqa: E731
            changes.append(f"{prefix}{key} ({shown(old)!r} -> {shown(new)!r})")
    return changes


@contextlib.contextmanager
def resumable_output_dir(out: Path, identity: dict, force: bool = False, resume: bool = False) -> Iterator[Path]:
    """Yield the work directory of `out`, renamed to `out` when the block succeeds.

    Without `resume`, an existing work directory (an unfinished run) is refused unless
    `force` discards it. With `resume`, its run.json must equal `identity`. Bad input found
    during the run (InputError) removes the work directory; any other failure keeps it for
    `--resume`, and an OSError (disk full, unwritable directory) becomes an InputError that
    says what failed and what was kept.
    """
    out = Path(out)
    check_output_dir(out, force)
    work = work_dir_for(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(work.with_name(work.name + ".lock"), "w")
    except OSError as exc:
        raise InputError(f"{out.parent}: cannot create the output here ({exc.strerror})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{work}: another run is writing this output now") from None
        try:
            _prepare_work_dir(work, out, identity, force, resume)
            try:
                yield work
            except InputError:
                shutil.rmtree(work, ignore_errors=True)
                raise
            except OSError as exc:
                raise InputError(_io_failure_message(exc, work)) from exc
            shutil.rmtree(work / RESUME_DIR, ignore_errors=True)
            (work / RUN_FILE).unlink(missing_ok=True)
            replace_dir(work, out)
        finally:
            Path(lock.name).unlink(missing_ok=True)  # still ours: we hold the lock


def _prepare_work_dir(work: Path, out: Path, identity: dict, force: bool, resume: bool) -> None:
    if work.exists() and not resume:
        if not force:
            raise InputError(f"{work}: an unfinished run of {out.name} is here; pass --resume to continue it "
                             "or --force to discard it and start over")
        shutil.rmtree(work)
    if work.exists():
        run_file = work / RUN_FILE
        if not run_file.is_file():
            raise InputError(f"{work}: no {RUN_FILE}, so not a resumable run; pass --force to start over")
        changes = identity_changes(json.loads(run_file.read_text()), identity)
        if changes:
            raise InputError(f"{work}: cannot resume, the run was started with different inputs: {'; '.join(changes)}. "
                             "Rerun with the original inputs, or pass --force to start over")
        return
    work.mkdir()
    write_json_atomic(work / RUN_FILE, identity)


def _io_failure_message(exc: OSError, work: Path) -> str:
    what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    where = f" writing {exc.filename}" if exc.filename else ""
    return (f"{where.strip() or 'writing the output'}: {what}. Finished layers are kept in {work}; "
            "fix the cause and rerun the same command with --resume")


def save_progress(work: Path, next_layer: int, hidden: torch.Tensor | None) -> None:
    """Record that every layer before `next_layer` is finished, with the hidden states
    [S, L, D] entering `next_layer` (None for RTN, which needs none)."""
    folder = Path(work) / RESUME_DIR
    folder.mkdir(exist_ok=True)
    record = {"next_layer": next_layer, "hidden_sha256": None}
    if hidden is not None:
        save_safetensors_atomic({"hidden": hidden}, folder / HIDDEN_FILE)
        record["hidden_sha256"] = sha256_file(folder / HIDDEN_FILE)
    write_json_atomic(folder / PROGRESS_FILE, record)


def load_progress(work: Path, finished_layers: set[int]) -> tuple[int, torch.Tensor | None]:
    """(next layer, hidden states entering it) recorded in `work`, or (0, None) for a new
    run; InputError if the record disagrees with the layer files or the hidden states file."""
    from safetensors.torch import load_file

    folder = Path(work) / RESUME_DIR
    if not (folder / PROGRESS_FILE).is_file():
        return 0, None
    record = json.loads((folder / PROGRESS_FILE).read_text())
    next_layer = int(record["next_layer"])
    missing = sorted(set(range(next_layer)) - finished_layers)
    if missing:
        raise InputError(f"{work}: progress says layers < {next_layer} are finished, but layers {missing} are missing; "
                         "pass --force to start over")
    if record["hidden_sha256"] is None:
        return next_layer, None
    path = folder / HIDDEN_FILE
    if not path.is_file() or sha256_file(path) != record["hidden_sha256"]:
        raise InputError(f"{path}: missing or does not match {PROGRESS_FILE}; pass --force to start over")
    return next_layer, load_file(str(path))["hidden"]
