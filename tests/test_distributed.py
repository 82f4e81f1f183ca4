"""Expert parallelism on torch.distributed: `torchrun --nproc-per-node 2 -m maverick_quant
quantize ...` (gloo, 2 CPU processes) splits each MoE layer's expert chunks between the ranks
and writes tensor files byte-identical to a single-process run's (one thread per process, as
torchrun sets); an output rank 0 refuses stops both ranks; a killed run resumes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maverick_quant.outputs import KILL_DURING_WRITE

REPO = Path(__file__).resolve().parents[1]


def _args(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    # --moe-chunk-mib 1: each MoE layer's 8 experts form 2 chunks (7 + 1), one per rank
    return ["quantize", str(model), "--method", "gptq", "--data", str(text), "--samples", "4", "--seq-len", "32",
            "--group-size", "32", "--moe-chunk-mib", "1", "--out", str(out), "--no-progress", *extra]


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _single(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maverick_quant", *args], env=_env(**env), capture_output=True,
                          text=True, timeout=600)


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "maverick_quant", *args], env=_env(), capture_output=True, text=True, timeout=600)


def _tensor_files(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def single_process(tiny_llama4_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(calibration text, the bundle of a single-process run)."""
    root = tmp_path_factory.mktemp("single")
    text = root / "calib.txt"
    text.write_text("The river runs past the old mill and under the stone bridge. " * 200)
    done = _single(_args(tiny_llama4_dir, text, root / "bundle"))
    assert done.returncode == 0, done.stdout + done.stderr
    return text, root / "bundle"


def test_two_processes_write_the_single_process_bundle_byte_for_byte(tiny_llama4_dir: Path, single_process,
                                                                     tmp_path: Path) -> None:
    text, reference = single_process
    done = _torchrun(_args(tiny_llama4_dir, text, tmp_path / "bundle"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("quantized 4 layers") == 1  # rank 0 reports; rank 1 writes and says nothing
    files = _tensor_files(tmp_path / "bundle")
    assert sum("experts" in name for name in files) == 4  # 2 MoE layers x 2 chunks, one solved on each rank
    assert files == _tensor_files(reference)
    assert (tmp_path / "bundle" / "audit.json").read_bytes() == (reference / "audit.json").read_bytes()
    assert not list(tmp_path.glob(".bundle.*")), "no work directory or run state is left behind"


def test_an_output_rank_0_refuses_stops_both_ranks_then_resumes_under_torchrun(tiny_llama4_dir: Path, single_process,
                                                                               tmp_path: Path) -> None:
    """A killed single-process run leaves an unfinished output: torchrun without --resume is
    refused by rank 0 and rank 1 stops with it (no hang); with --resume both ranks go on
    from rank 0's saved progress and the bundle equals the single-process one."""
    text, reference = single_process
    args = _args(tiny_llama4_dir, text, tmp_path / "bundle")
    killed = _single(args, **{KILL_DURING_WRITE: "5"})  # while writing layer 1's own file, after its 2 chunks
    assert killed.returncode != 0
    refused = _torchrun(args)
    assert refused.returncode != 0 and "--resume" in refused.stdout + refused.stderr
    assert "rank 1 stops" in refused.stdout + refused.stderr
    resumed = _torchrun(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _tensor_files(tmp_path / "bundle") == _tensor_files(reference)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["run_identity"]["quantize"]["moe"]["chunk_mib"] == 1


RANK_SCRIPT = """
import sys
from pathlib import Path
from maverick_quant.distributed import ExpertParallel
from maverick_quant.errors import InputError

parallel, outcomes = ExpertParallel.from_env(), []
for attempt in ATTEMPTS:
    try:
        CALL
        outcomes.append("agreed")
    except InputError as exc:
        outcomes.append(f"refused, keep_work={exc.keep_work}: {exc}")
Path(sys.argv[1], f"rank{parallel.rank}.txt").write_text("\\n".join(outcomes))
parallel.close()
"""


def _two_ranks_try(tmp_path: Path, attempts: str, call: str) -> list[list[str]]:
    """Each rank's outcome ("agreed" or "refused, keep_work=...: message") of `call` (Python, with
    `parallel` and `attempt` in scope) for each of `attempts`, under torchrun with 2 processes."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.replace("ATTEMPTS", attempts).replace("CALL", call))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [(tmp_path / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]


def test_ranks_that_would_resume_at_different_layers_all_stop_keeping_the_work(tmp_path: Path) -> None:
    """A rank without rank 0's run state (the output on host 0 only) would start at layer 0 while
    rank 0 resumes at layer k; the chunk collectives would still pair up, and rank 0 would write
    other layers' experts as layer k's. Both ranks stop instead, and the finished work is kept."""
    outcomes = _two_ranks_try(tmp_path, "((3, 3), (3, 0))",  # the second: a rank that did not see rank 0's run state
                              'parallel.check_same_start(attempt[0] if parallel.writes else attempt[1], Path("/shared/out.state"))')
    for rank, (agreed, refused) in enumerate(outcomes):
        assert agreed == "agreed" and refused.startswith("refused, keep_work=True"), refused
        assert f"rank 0: layer 3, rank {rank}: layer {3 if rank == 0 else 0}" in refused and "/shared/out.state" in refused


def test_ranks_given_other_calibration_data_all_stop_naming_it(tmp_path: Path) -> None:
    """Another calibration file (or model copy, options, tool version) on one host mixed that
    rank's experts into rank 0's bundle with exit 0; every rank now stops, naming what differs."""
    same = '{"source_fingerprint": "f", "calibration_sha256": "c", "quantize": {"bits": 4}}'
    outcomes = _two_ranks_try(tmp_path, f'({same}, {{**{same}, "calibration_sha256": "c" if parallel.writes else "x"}})',
                              "parallel.check_same_inputs(attempt)")
    for agreed, refused in outcomes:
        assert agreed == "agreed" and refused.startswith("refused, keep_work=True"), refused
        assert "calibration_sha256 differ from rank 0's" in refused and "source_fingerprint" not in refused


def test_commands_that_do_not_split_refuse_torchrun(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """validate, export, imatrix... under torchrun ran whole in every process, writing the same outputs."""
    from click.testing import CliRunner

    from maverick_quant.cli import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_llama_dir), "--data", "self", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "calibrate runs as one process (WORLD_SIZE=2)" in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_a_recipe_under_torchrun_exports_once_from_rank_0(tiny_llama4_dir: Path, single_process, tmp_path: Path) -> None:
    """`run RECIPE` under torchrun: every rank used to go on to the exports and validations after
    quantizing, racing rank 0's rename of the bundle (`not a bundle`) and writing the same files."""
    import yaml

    text, reference = single_process
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_llama4_dir),
        "calibration": {"data": str(text), "samples": 4, "seq_len": 32},
        "quantize": {"method": "gptq", "group_size": 32, "moe": {"chunk_mib": 1}},
        "exports": [{"format": "gptq"}]}))
    done = _torchrun(["run", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("exported gptq") == 1, done.stdout
    assert _tensor_files(tmp_path / "run" / "bundle") == _tensor_files(reference)
    assert (tmp_path / "run" / "model-gptq" / "config.json").is_file()
