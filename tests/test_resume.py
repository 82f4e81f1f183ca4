"""Resume after a crash: a real `quantize` process is SIGKILLed (at random moments and in the
middle of chosen atomic writes), resumed with --resume, and the final bundle's tensor files
are byte-identical to an uninterrupted run's. A resume with different inputs is refused
naming what changed; a disk that fills up keeps the finished layers and resumes."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from maverick_quant.bundle import Bundle
from maverick_quant.outputs import KILL_DURING_WRITE
from maverick_quant.cli import cli
from maverick_quant.resume import state_dir_for, work_dir_for

REPO = Path(__file__).resolve().parents[1]


def _quantize_args(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "--method", "gptq", "--data", str(text), "--samples", "4", "--seq-len", "32",
            "--group-size", "32", "--moe-chunk-mib", "1", "--out", str(out), "--no-progress", *extra]


def _spawn(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "maverick_quant", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _tensor_files(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*.safetensors"))}


def _layer_records(bundle: Path) -> dict[str, dict]:
    """Layer stats files without their timings."""
    def strip(record):
        if isinstance(record, dict):
            return {k: strip(v) for k, v in record.items() if k != "seconds"}
        return [strip(v) for v in record] if isinstance(record, list) else record
    return {p.name: strip(json.loads(p.read_text())) for p in sorted((bundle / "layers").glob("*.json"))}


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama4_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(calibration text, the bundle of an uninterrupted run)."""
    root = tmp_path_factory.mktemp("resume_reference")
    text = root / "calib.txt"
    source = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
    text.write_text("\n".join(source.read_text(encoding="utf-8").splitlines()[:300]) if source.is_file()
                    else "The river runs past the old mill and under the stone bridge. " * 200)
    process = _spawn(_quantize_args(tiny_llama4_dir, text, root / "bundle"))
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return text, root / "bundle"


def _kill_during_write(args: list[str], write_number: int) -> None:
    """Run `args` and SIGKILL it in the middle of its `write_number`-th atomic tensor write."""
    process = _spawn(args, {KILL_DURING_WRITE: str(write_number)})
    output, _ = process.communicate(timeout=600)
    assert process.returncode == -signal.SIGKILL, output


def _resume_until_done(args: list[str], bundle: Path) -> int:
    """Run with --resume until the bundle exists; the number of runs it took."""
    for attempt in range(1, 4):
        process = _spawn(args + ["--resume"])
        output, _ = process.communicate(timeout=600)
        if process.returncode == 0:
            return attempt
        assert process.returncode == -signal.SIGKILL, output
    raise AssertionError(f"{bundle} was not finished after 3 resumes")


@pytest.mark.slow
def test_sigkill_mid_write_then_resume_gives_identical_tensor_files(tiny_llama4_dir: Path, uninterrupted, tmp_path: Path) -> None:
    """Killed inside the 2nd atomic write (layer 0's hidden states), then inside the 5th of the
    resumed run (an expert chunk of layer 1 or later): half a temporary file is left each time,
    and the resumed bundle equals the uninterrupted one, tensor file by tensor file."""
    text, reference = uninterrupted
    bundle = tmp_path / "bundle"
    args = _quantize_args(tiny_llama4_dir, text, bundle)
    _kill_during_write(args, 2)
    work, state = work_dir_for(bundle), state_dir_for(bundle)
    assert not bundle.exists() and any(state.rglob(".*.tmp")), "half of layer 0's hidden states should be left"
    _kill_during_write(args + ["--resume"], 5)
    assert _resume_until_done(args, bundle) == 1
    assert not work.exists() and not state.exists()
    assert _tensor_files(bundle) == _tensor_files(reference)
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk  # the run's state never enters the bundle or its manifest
    assert manifest["run_identity"]["calibration_sha256"] and manifest["run_identity"]["quantize"]["method"] == "gptq"
    assert _layer_records(bundle) == _layer_records(reference)


def _wait_for_files(folder: Path, count: int, process: subprocess.Popen) -> None:
    """Poll until `folder` holds `count` files (or the process ends)."""
    while process.poll() is None and (not folder.is_dir() or sum(1 for _ in folder.iterdir()) < count):
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_tensor_files(tiny_llama4_dir: Path, uninterrupted,
                                                                           tmp_path: Path) -> None:
    """Killed at a random moment of the quantize phase: after a random number of the bundle's
    layer files exist (so the run cannot have finished), plus a random delay up to 50 ms."""
    text, reference = uninterrupted
    files = sum(1 for _ in (reference / "layers").iterdir())
    rng = random.Random(20261123)
    for trial in range(3):
        bundle = tmp_path / f"bundle{trial}"
        args = _quantize_args(tiny_llama4_dir, text, bundle)
        process = _spawn(args)
        _wait_for_files(work_dir_for(bundle) / "layers", rng.randint(1, files - 4), process)
        time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL and not bundle.exists(), f"trial {trial} was not interrupted"
        _resume_until_done(args, bundle)
        assert _tensor_files(bundle) == _tensor_files(reference), f"trial {trial}"


@pytest.mark.slow
def test_resume_with_other_inputs_is_refused_naming_what_changed(tiny_llama4_dir: Path, uninterrupted,
                                                                 tmp_path: Path) -> None:
    text, _ = uninterrupted
    bundle = tmp_path / "bundle"
    _kill_during_write(_quantize_args(tiny_llama4_dir, text, bundle), 3)
    runner = CliRunner()
    result = runner.invoke(cli, _quantize_args(tiny_llama4_dir, text, bundle, "--resume", "--damp", "0.05"))
    assert result.exit_code == 2 and "quantize.weights.damp (0.01 -> 0.05)" in result.output, result.output
    result = runner.invoke(cli, _quantize_args(tiny_llama4_dir, text, bundle))
    assert result.exit_code == 2 and "--resume" in result.output and "--force" in result.output
    assert work_dir_for(bundle).is_dir() and not bundle.exists()


def _small_gptq_args(model: Path, text: Path):
    """quantize arguments of a small GPTQ run on `model` as a function of its output."""
    return lambda out: ["quantize", str(model), "--method", "gptq", "--data", str(text), "--samples", "2",
                        "--seq-len", "32", "--group-size", "32", "--out", str(out), "--no-progress"]


def _disk_full_on(file_name: str, monkeypatch: pytest.MonkeyPatch):
    """Make the bundle writer's atomic save of `file_name` fail with ENOSPC; returns the real save."""
    import maverick_quant.bundle as bundle_module

    real_save = bundle_module.save_safetensors_atomic

    def full_disk(tensors, path, metadata=None):
        if path.name == file_name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(tensors, path, metadata)

    monkeypatch.setattr(bundle_module, "save_safetensors_atomic", full_disk)
    return real_save


def test_disk_full_keeps_finished_layers_and_resumes(tiny_llama_dir: Path, small_text_file: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC on the 3rd layer file: exit 2 with a message naming the file, the disk and
    --resume; the finished layers stay; the resumed bundle equals an uninterrupted run's."""
    import maverick_quant.bundle as bundle_module

    args, runner = _small_gptq_args(tiny_llama_dir, small_text_file), CliRunner()
    assert runner.invoke(cli, args(tmp_path / "reference")).exit_code == 0
    real_save = _disk_full_on("layer-00002.safetensors", monkeypatch)
    result = runner.invoke(cli, args(tmp_path / "bundle"))
    assert result.exit_code == 2, result.output
    assert "layer-00002.safetensors" in result.output and "disk is full" in result.output and "--resume" in result.output
    kept = sorted(p.name for p in (work_dir_for(tmp_path / "bundle") / "layers").glob("*.safetensors"))
    assert kept == ["layer-00000.safetensors", "layer-00001.safetensors"]
    monkeypatch.setattr(bundle_module, "save_safetensors_atomic", real_save)
    result = runner.invoke(cli, args(tmp_path / "bundle") + ["--resume"])
    assert result.exit_code == 0, result.output
    assert _tensor_files(tmp_path / "bundle") == _tensor_files(tmp_path / "reference")
    assert set(Bundle(tmp_path / "bundle").manifest["files"]) == set(Bundle(tmp_path / "reference").manifest["files"])


def test_an_output_that_cannot_be_created_is_named(tiny_llama_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(cli, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--out",
                                      str(blocker / "bundle"), "--no-progress"])
    assert result.exit_code == 2 and str(tmp_path / "a-file") in result.output, result.output


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "bundle"
    work = work_dir_for(out)
    with open(work.with_name(work.name + ".lock"), "w") as held:  # what a running quantize holds
        fcntl.flock(held, fcntl.LOCK_EX)
        result = CliRunner().invoke(cli, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--out", str(out),
                                          "--no-progress"])
    assert result.exit_code == 2 and "another run is writing" in result.output, result.output
    assert not out.exists() and not work.exists()


def test_a_run_whose_lock_file_was_removed_while_it_waited_stops(tiny_llama_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that opened the lock file just before a finishing run removed it, and locked it just
    after, holds a file no later run sees: it stops instead of writing beside them."""
    import fcntl

    import maverick_quant.resume as resume

    out, real_flock = tmp_path / "bundle", fcntl.flock

    def finishing_run_removes_the_file(handle, operation):
        Path(handle.name).unlink()  # what the finishing run's `finally` does, while we wait
        Path(handle.name).write_text("")  # and a third run creates it anew
        return real_flock(handle, operation)

    monkeypatch.setattr(resume.fcntl, "flock", finishing_run_removes_the_file)
    result = CliRunner().invoke(cli, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and "another run of this output removed its lock file while this one started" in result.output, result.output
    assert not out.exists() and not work_dir_for(out).exists()


@pytest.mark.slow
def test_a_run_killed_inside_a_moe_layer_reuses_the_expert_chunks_it_finished(tiny_llama4_dir: Path, uninterrupted,
                                                                            tmp_path: Path) -> None:
    """Killed while writing layer 1's second expert chunk (writes: layer 0, its hidden states,
    then layer 1's chunks: experts 0-6, then 7, within --moe-chunk-mib 1): the resumed run keeps
    the chunk file already written (same inode and modification time: not solved or written
    again) and still equals the uninterrupted run."""
    text, reference = uninterrupted
    bundle = tmp_path / "bundle"
    args = _quantize_args(tiny_llama4_dir, text, bundle)
    _kill_during_write(args, 4)
    layers = work_dir_for(bundle) / "layers"
    finished = sorted(layers.glob("layer-00001-experts-*.safetensors"))
    assert [p.name for p in finished] == ["layer-00001-experts-00000.safetensors"]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}
    assert _resume_until_done(args, bundle) == 1
    after = {name: ((bundle / "layers" / name).stat().st_ino, (bundle / "layers" / name).stat().st_mtime_ns)
             for name in before}
    assert after == before
    assert _tensor_files(bundle) == _tensor_files(reference)
    assert _layer_records(bundle) == _layer_records(reference)


def test_hidden_states_are_bound_to_their_layer_by_name(tmp_path: Path) -> None:
    """The hidden states entering layer i live in hidden-0000i.safetensors, named in
    progress.json: a file written after the last progress record (a crash between the two)
    is not taken, the previous file goes once the record moves on, and an unreadable one is
    refused naming it. A state written by the earlier, sha256-checked layout still loads."""
    import hashlib

    import torch

    from maverick_quant.outputs import save_safetensors_atomic, write_json_atomic
    from maverick_quant.errors import InputError
    from maverick_quant.resume import RunState, hidden_file

    state = RunState(tmp_path, {})
    first, second = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    state.save_progress(1, first)
    state.save_progress(2, second)
    assert sorted(p.name for p in tmp_path.glob("hidden*")) == ["hidden-00002.safetensors"]
    save_safetensors_atomic({"hidden": first}, tmp_path / hidden_file(3))  # killed before progress.json moved on
    next_layer, hidden = state.load_progress({0, 1})
    assert next_layer == 2 and torch.equal(hidden, second)
    path = tmp_path / hidden_file(2)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(InputError, match=r"hidden-00002\.safetensors: the hidden states entering layer 2 cannot be read"):
        state.load_progress({0, 1})

    legacy = RunState(tmp_path / "legacy", {})
    legacy.folder.mkdir()
    save_safetensors_atomic({"hidden": first}, legacy.folder / "hidden.safetensors")
    digest = hashlib.sha256((legacy.folder / "hidden.safetensors").read_bytes()).hexdigest()
    write_json_atomic(legacy.folder / "progress.json", {"next_layer": 1, "hidden_sha256": digest})
    assert torch.equal(legacy.load_progress({0})[1], first)


def test_a_run_stopped_after_its_last_layer_resumes_without_recomputing_anything(
        tiny_llama_dir: Path, small_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC on the pass-through file, after all 3 layers: no hidden states are kept after the
    last layer, and --resume only finishes the bundle (no embedding, no layer), equal to an
    uninterrupted run's."""
    import maverick_quant.bundle as bundle_module
    from maverick_quant.bundle import PASSTHROUGH
    from maverick_quant.streaming import StreamingModel

    args, runner = _small_gptq_args(tiny_llama_dir, small_text_file), CliRunner()
    assert runner.invoke(cli, args(tmp_path / "reference")).exit_code == 0
    real_save = _disk_full_on(Path(PASSTHROUGH).name, monkeypatch)
    assert runner.invoke(cli, args(tmp_path / "bundle")).exit_code == 2
    state = state_dir_for(tmp_path / "bundle")
    assert json.loads((state / "progress.json").read_text())["next_layer"] == 3 and not list(state.glob("hidden*"))
    monkeypatch.setattr(bundle_module, "save_safetensors_atomic", real_save)
    (work_dir_for(tmp_path / "bundle") / ".manifest.json.tmp").write_text("{")  # as a kill inside the manifest's write leaves
    monkeypatch.setattr(StreamingModel, "embed", lambda *a: pytest.fail("embedded the calibration tokens again"))
    monkeypatch.setattr(StreamingModel, "layer", lambda *a: pytest.fail("built a finished layer again"))
    result = runner.invoke(cli, args(tmp_path / "bundle") + ["--resume"])
    assert result.exit_code == 0, result.output
    assert _tensor_files(tmp_path / "bundle") == _tensor_files(tmp_path / "reference")
    assert set(Bundle(tmp_path / "bundle").manifest["files"]) == set(Bundle(tmp_path / "reference").manifest["files"])
    summaries = [Bundle(tmp_path / name).manifest["summary"]["mean_rel_loss"] for name in ("bundle", "reference")]
    assert summaries[0] == pytest.approx(summaries[1], rel=1e-12)  # over every layer, not the resumed run's none


def test_a_finished_layer_damaged_before_a_resume_is_refused_not_built_into_the_bundle(
        tiny_llama_dir: Path, small_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished layer file that changed while the run was stopped cannot be redone (the hidden
    states entering it are gone): --resume refuses, naming it and keeping the work, where it used
    to finish a bundle around it and exit 0. A byte changed in the last finished layer is found
    by its sha256; an earlier layer cut short, by its header (hashing every layer would read
    the whole bundle at each resume)."""
    import maverick_quant.bundle as bundle_module
    from maverick_quant.bundle import PASSTHROUGH

    args, runner = _small_gptq_args(tiny_llama_dir, small_text_file), CliRunner()
    real_save = _disk_full_on(Path(PASSTHROUGH).name, monkeypatch)
    assert runner.invoke(cli, args(tmp_path / "bundle")).exit_code == 2
    monkeypatch.setattr(bundle_module, "save_safetensors_atomic", real_save)
    work = work_dir_for(tmp_path / "bundle")
    last, earlier = work / "layers" / "layer-00002.safetensors", work / "layers" / "layer-00000.safetensors"
    original = last.read_bytes()
    last.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    result = runner.invoke(cli, args(tmp_path / "bundle") + ["--resume"])
    assert result.exit_code == 2 and "layers/layer-00002.safetensors" in result.output, result.output
    assert "restore the file, or pass --force" in result.output and work.is_dir() and not (tmp_path / "bundle").exists()
    last.write_bytes(original)
    os.truncate(earlier, 1000)
    result = runner.invoke(cli, args(tmp_path / "bundle") + ["--resume"])
    assert result.exit_code == 2 and "layers/layer-00000.safetensors" in result.output and work.is_dir(), result.output


def test_activations_turning_nan_keep_the_finished_layers_for_a_resume(tiny_llama_dir: Path, small_text_file: Path,
                                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN/Inf calibration activations after layer 1 are bad input (exit 2), found hours in on
    Maverick: they used to delete every finished layer with the run's state."""
    import maverick_quant.streaming as streaming_module

    real_check, outputs = streaming_module.all_finite, []

    def nan_after_layer_1(hidden):
        outputs.append(hidden)
        return real_check(hidden) and len(outputs) != 2

    monkeypatch.setattr(streaming_module, "all_finite", nan_after_layer_1)
    result = CliRunner().invoke(cli, _small_gptq_args(tiny_llama_dir, small_text_file)(tmp_path / "bundle"))
    assert result.exit_code == 2 and "NaN/Inf at the output of layer 1" in result.output, result.output
    assert "--resume" in result.output and state_dir_for(tmp_path / "bundle").is_dir()
    assert (work_dir_for(tmp_path / "bundle") / "layers" / "layer-00000.safetensors").is_file()


def test_a_run_step_given_resume_and_force_starts_an_unfinished_run_of_other_inputs_over(tmp_path: Path,
                                                                                          capsys) -> None:
    """`run --resume` after a validation setting changed refused with advice (drop --resume, add
    --force) that made the whole bundle again; `--resume --force` now starts that step over."""
    from maverick_quant.errors import InputError
    from maverick_quant.resume import resumable_output_dir

    out = tmp_path / "report"
    with pytest.raises(RuntimeError):  # a run of ctx 512 interrupted
        with resumable_output_dir(out, {"ctx": 512}) as (work, _):
            (work / "half.json").write_text("{}")
            raise RuntimeError("interrupted")
    with pytest.raises(InputError, match=r"ctx \(512 -> 256\).*--resume --force starts an unfinished validation over"):
        with resumable_output_dir(out, {"ctx": 256}, force=True, resume=True):
            pass
    assert (work_dir_for(out) / "half.json").is_file()  # refused: kept as it was
    with resumable_output_dir(out, {"ctx": 256}, force=True, resume=True, restart_changed="the validation") as (work, _):
        assert not (work / "half.json").exists()  # started over
        (work / "report.json").write_text("{}")
    assert "the validation starts over: its unfinished run had other inputs (ctx (512 -> 256))" in capsys.readouterr().out
    assert (out / "report.json").is_file() and not state_dir_for(out).exists()


def _cli_with_file_size_limit(limit: int, *args) -> subprocess.CompletedProcess:
    """`maverick-quant ARGS` in a process that cannot write a file past `limit` bytes: every
    write beyond it fails with EFBIG (Python ignores SIGXFSZ), as writes to a full disk fail."""
    import resource

    return subprocess.run([sys.executable, "-m", "maverick_quant", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


def test_real_failing_writes_exit_2_naming_the_file(tiny_llama_dir: Path, small_text_file: Path,
                                                    tmp_path: Path) -> None:
    """safetensors' writer reports a failed write (a full disk) as a SafetensorError, which is no
    OSError: quantize, validate and imatrix exited 3 with a traceback instead of exit 2 naming
    the file and keeping the finished layers; a failed export, or `run`'s, exited 3 too."""
    quantize = ["quantize", tiny_llama_dir, "--method", "rtn", "--group-size", "32", "--no-progress"]
    failed = _cli_with_file_size_limit(32 * 1024, *quantize, "--out", tmp_path / "bundle")
    assert failed.returncode == 2, failed.stderr + failed.stdout
    assert "File too large. Finished layers are kept in" in failed.stderr and ".safetensors" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "bundle").exists()
    resumed = _cli_with_file_size_limit(1 << 30, *quantize, "--out", tmp_path / "bundle", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    failed = _cli_with_file_size_limit(32 * 1024, "export", tmp_path / "bundle", "--format", "gptq", "--out",
                                       tmp_path / "gptq", "--no-progress")
    assert failed.returncode == 2 and "File too large; fix the cause and run the command again" in failed.stderr, \
        failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "gptq").exists()
