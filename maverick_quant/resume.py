"""Resumable quantize runs: a fixed work directory, a fingerprint, and per-layer progress.

A run builds the bundle in `.NAME.partial` beside its output `NAME` (finished layers, each
file written atomically) and renames it to `NAME` only when it is complete. The run's state
lives beside it in `.NAME.resume`, never inside the bundle (whose manifest hashes every file):

    run.json              what the run is computing: source model fingerprint, the quantize
                          spec, the calibration tokens' sha256, tool version (also kept in
                          the finished bundle's manifest as `run_identity`)
    hidden-NNNNN.safetensors  the calibration hidden states entering layer NNNNN
    progress.json         {"next_layer": i, "hidden_file": "hidden-0000i.safetensors"},
                          written after the hidden states, so it never points at a
                          half-written file; the previous hidden-states file is removed after it

Every file is written to a temporary name, flushed to the disk and renamed
(outputs.durable_replace), so a finished file survives a power loss. The hidden states are
bound to their layer by name rather than by a checksum: for Maverick they are 20 GiB per
layer, and a sha256 after each of 48 layers would hash a terabyte (docs/maverick.md).

After a crash (SIGKILL, power loss, disk full) `--resume` checks run.json against the new
invocation (a mismatch is refused, naming what changed), loads the hidden states and goes
on at `next_layer`. Every computation is deterministic for a given machine and thread
count, so the resumed bundle's tensor files are byte-identical to an uninterrupted run's.
A lock file beside the work directory keeps two runs from writing it at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import click
import torch
from safetensors import SafetensorError

from maverick_quant import __version__
from maverick_quant.checkpoint import sha256_file
from maverick_quant.outputs import (check_output_dir, durable_replace, io_failure, replace_dir, save_safetensors_atomic,
                                    warn_leftovers, write_json_atomic)
from maverick_quant.errors import InputError

RUN_FILE = "run.json"
LEGACY_HIDDEN_FILE = "hidden.safetensors"  # before hidden states were named by layer (checked by sha256)
PROGRESS_FILE = "progress.json"
CHUNKS_DIR = "chunks"  # one record per finished expert chunk of the layer in progress
RESULTS_DIR = "results"  # what a forward-only walk gathered, one file per finished layer (walk.py)


def work_dir_for(out: Path) -> Path:
    """The fixed work directory of output `out`: `.NAME.partial` beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def state_dir_for(out: Path) -> Path:
    """Where a run of output `out` keeps its state: `.NAME.resume` beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.resume")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_identity(source_fingerprint: str, spec: dict, calibration_ids: torch.Tensor | None,
                 job: str = "quantize") -> dict:
    """What a run computes (`job`: quantize, imatrix, calibrate, with its options `spec`); a
    resumed run must match it exactly (JSON values, as stored)."""
    identity = {"source_fingerprint": source_fingerprint, job: spec, "tool_version": __version__,
                "calibration_sha256": None if calibration_ids is None else tensor_sha256(calibration_ids)}
    return json.loads(json.dumps(identity, default=str))


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


@dataclass(frozen=True)
class RunState:
    """The state folder of a run and the identity it was started with."""

    folder: Path
    identity: dict

    def save_progress(self, next_layer: int, hidden: torch.Tensor | None, device: str | None = None) -> None:
        """Record that every layer before `next_layer` is finished, with the hidden states
        [S, L, D] entering `next_layer` (None for RTN, which needs none), computed on `device`
        (devices.device_label)."""
        record = {"next_layer": next_layer, "hidden_file": None if hidden is None else hidden_file(next_layer),
                  "device": device}
        save_layer_progress(self.folder, PROGRESS_FILE, record, record["hidden_file"],
                            None if hidden is None else {"hidden": hidden}, "hidden*.safetensors")

    def _chunk_path(self, index: int, first: int) -> Path:
        return self.folder / CHUNKS_DIR / f"layer-{index:05d}-experts-{first:05d}.json"

    def save_chunk(self, index: int, first: int, record: dict, audit: list[dict]) -> None:
        """Record that layer `index`'s expert chunk starting at `first` is on disk (`record`, as
        the bundle writer returned it) with its experts' audit entries."""
        self._chunk_path(index, first).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._chunk_path(index, first), {"record": record, "audit": audit})

    def load_chunk(self, index: int, first: int) -> tuple[dict, list[dict]] | None:
        """(record, audit) of a chunk finished by an earlier attempt at this run, or None."""
        path = self._chunk_path(index, first)
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        return saved["record"], saved["audit"]

    def _results_path(self, index: int) -> Path:
        return self.folder / RESULTS_DIR / f"layer-{index:05d}.safetensors"

    def save_layer_results(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """What a forward-only walk (walk.py: imatrix, coverage) gathered in layer `index`,
        written before the progress record that counts the layer finished."""
        self._results_path(index).parent.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(tensors, self._results_path(index))

    def layer_results(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors `save_layer_results` kept for layer `index` (InputError if unreadable)."""
        return read_layer_tensors(self._results_path(index), index, "what layer {} gathered")

    def finished_results(self) -> set[int]:
        """The layers whose results an earlier attempt kept."""
        return {int(path.stem.removeprefix("layer-")) for path in (self.folder / RESULTS_DIR).glob("layer-*.safetensors")}

    def recorded_device(self) -> str | None:
        """The device the finished layers were computed on (devices.device_label), if recorded."""
        path = self.folder / PROGRESS_FILE
        return json.loads(path.read_text()).get("device") if path.is_file() else None

    def load_progress(self, finished_layers: set[int]) -> tuple[int, torch.Tensor | None]:
        """(next layer, hidden states entering it), or (0, None) for a new run; InputError if
        the record disagrees with the finished layer files or the hidden states file."""
        if not (self.folder / PROGRESS_FILE).is_file():
            return 0, None
        record = json.loads((self.folder / PROGRESS_FILE).read_text())
        next_layer = int(record["next_layer"])
        missing = sorted(set(range(next_layer)) - finished_layers)
        if missing:
            raise InputError(f"{self.folder}: progress says layers < {next_layer} are finished, but layers {missing} "
                             "are missing; pass --force to start over")
        if "hidden_sha256" in record:  # written by an earlier version
            return next_layer, _legacy_hidden(self.folder, record["hidden_sha256"])
        if record["hidden_file"] is None:
            return next_layer, None
        return next_layer, read_layer_tensors(self.folder / record["hidden_file"], next_layer)["hidden"]


def save_layer_progress(folder: Path, pointer: str, record: dict, tensors_file: str | None,
                        tensors: dict[str, torch.Tensor] | None, stale: str) -> None:
    """Progress of a layer-by-layer run (quantize, validate): `tensors` (the hidden states entering
    the next layer; None: none kept) to folder/`tensors_file`, then `record` to folder/`pointer`,
    written after the tensors so it never names a half-written file, then every other file
    matching the glob `stale` (the previous layer's hidden states) removed."""
    if tensors is not None:
        save_safetensors_atomic(tensors, folder / tensors_file)
    write_json_atomic(folder / pointer, record)
    for path in folder.glob(stale):
        if path.name != tensors_file:
            path.unlink()


def read_layer_tensors(path: Path, next_layer: int, what: str = "the hidden states entering layer {}") -> dict[str, torch.Tensor]:
    """The hidden states entering `next_layer` that `save_layer_progress` wrote to `path` (or
    what `what`, formatted with the layer, names); InputError when the file is missing,
    truncated or not safetensors (a run that refuses it is discarded: the next one starts over)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:  # (not: out of memory)
        raise InputError(f"{path}: {what.format(next_layer)} cannot be read ({exc}); "
                         "the unfinished run is discarded, the next run starts over") from exc


def hidden_file(next_layer: int) -> str:
    """The name of the file holding the hidden states entering layer `next_layer`."""
    return f"hidden-{next_layer:05d}.safetensors"


def _legacy_hidden(folder: Path, sha256: str | None) -> torch.Tensor | None:
    """The hidden states of a run state written before they were named by layer."""
    from safetensors.torch import load_file

    if sha256 is None:
        return None
    path = folder / LEGACY_HIDDEN_FILE
    if not path.is_file() or sha256_file(path) != sha256:
        raise InputError(f"{path}: missing or does not match {PROGRESS_FILE}; pass --force to start over")
    return load_file(str(path))["hidden"]


def warn_if_resumed_elsewhere(state: RunState | None, label: str) -> str | None:
    """The device an interrupted run's finished layers were computed on, when it is not `label`
    (with a warning: the device is not part of a run's identity, so a run may go on elsewhere,
    but its output then mixes two devices' rounding and equals neither device's run byte for byte)."""
    previous = state.recorded_device() if state is not None else None
    if previous is None or previous == label:
        return None
    warnings.warn(f"resuming a run whose finished layers were computed on {previous} on {label}: the output will mix "
                  f"both devices' rounding (start over with --force for an output made on one device)", stacklevel=2)
    return previous


class ReadOnlyState(RunState):
    """The run state as the other ranks of an expert-parallel run see it: rank 0's progress,
    read at the start (to begin at the same layer with the same hidden states), never written."""

    def save_progress(self, next_layer: int, hidden: torch.Tensor | None, device: str | None = None) -> None:
        pass

    def save_chunk(self, index: int, first: int, record: dict, audit: list[dict]) -> None:
        pass


@contextlib.contextmanager
def resumable_output_dir(out: Path, identity: dict, force: bool = False, resume: bool = False,
                         single_file: bool = False, restart_changed: str | None = None) -> Iterator[tuple[Path, RunState]]:
    """Yield (work directory, run state) of `out`; the work directory becomes `out` when the
    block succeeds (`single_file`: the file work/NAME becomes the file `out`, the work directory
    is removed), and the state is removed.

    Without `resume`, an unfinished run is refused unless `force` discards it. With `resume`,
    its run.json must equal `identity`; `restart_changed` (a `run --resume --force` step: what
    the note calls the step) starts an unfinished run of other inputs over instead. Bad input found during the run (InputError) removes
    both, unless it says to keep the work (`keep_work`); any other failure keeps them for `--resume`, and an OSError (disk full, unwritable
    directory) becomes an InputError that says what failed and what was kept.
    """
    out = Path(out)
    check_output_dir(out, force)
    warn_leftovers(out)  # e.g. the .old-PID of a --force run killed while it removed the old output
    work, state = work_dir_for(out), RunState(state_dir_for(out), identity)
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
        if not _holds_the_lock_file(lock):  # a run that held it removed the file meanwhile (it finished or stopped)
            raise InputError(f"{work}: another run of this output removed its lock file while this one started; run again")
        try:
            check_output_dir(out, force)  # what that run may have made since the check above
            _prepare(work, state, out, force, resume, restart_changed)
            try:
                yield work, state
            except InputError as exc:
                if not exc.keep_work:
                    _discard(work, state)
                raise
            except OSError as exc:
                raise InputError(_io_failure_message(exc, work)) from exc
            if single_file:
                durable_replace(work / out.name, out)
                shutil.rmtree(work, ignore_errors=True)
            else:
                replace_dir(work, out)
            shutil.rmtree(state.folder, ignore_errors=True)
        finally:
            Path(lock.name).unlink(missing_ok=True)  # still ours: we hold the lock


def _holds_the_lock_file(lock) -> bool:
    """Whether the file `lock` holds is still the one at its path (a finishing run removes the
    path while it holds the lock: a second run that opened it before and locked it after would
    hold a file no third run sees, and all three would write the same output)."""
    try:
        linked = os.stat(lock.name)
    except FileNotFoundError:
        return False
    held = os.fstat(lock.fileno())
    return (held.st_dev, held.st_ino) == (linked.st_dev, linked.st_ino)


def _discard(work: Path, state: RunState) -> None:
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(state.folder, ignore_errors=True)


def _prepare(work: Path, state: RunState, out: Path, force: bool, resume: bool, restart_changed: str | None = None) -> None:
    """Start a new run, or check that an unfinished one may be resumed with this identity (or,
    with `restart_changed`, start one of other inputs over)."""
    unfinished = work.exists() or state.folder.exists()
    if unfinished and not resume:
        if not force:
            raise InputError(f"{work}: an unfinished run of {out.name} is here; pass --resume to continue it "
                             "or --force to discard it and start over")
        _discard(work, state)
    elif unfinished:
        run_file = state.folder / RUN_FILE
        if not run_file.is_file():
            raise InputError(f"{state.folder}: no {RUN_FILE}, so not a resumable run; to start over, rerun without "
                             "--resume and with --force")
        changes = identity_changes(json.loads(run_file.read_text()), state.identity)
        if changes and restart_changed:
            click.echo(f"note: {restart_changed} starts over: its unfinished run had other inputs ({'; '.join(changes)})")
            _discard(work, state)
        elif changes:
            raise InputError(f"{work}: cannot resume, the run was started with different inputs: {'; '.join(changes)}. "
                             "Rerun with the original inputs, or, to start over, without --resume and with --force "
                             "(under `run`: --resume --force starts an unfinished validation over and keeps the bundle)")
        else:
            work.mkdir(exist_ok=True)
            return
    work.mkdir()
    state.folder.mkdir()
    write_json_atomic(state.folder / RUN_FILE, state.identity)


def _io_failure_message(exc: OSError, work: Path) -> str:
    return f"{io_failure(exc)}. Finished layers are kept in {work}; fix the cause and rerun the same command with --resume"
