"""What the head-to-head benchmarks (vs_gptqmodel.py, vs_llmcompressor.py) share: our side.

Calibrate once, quantize with our CLI (timed as a whole process), score any candidate folder
with `maverick-quant validate` against the fp32 reference. Every step keeps its output in the
benchmark's --work folder and a rerun reuses it, so a long comparison can be resumed or
extended with one more candidate.

Imports nothing but the standard library at module level: the other tools' workers import
their script (and so this module) inside their own virtual environments, where maverick_quant
is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def our_cli(*args: str) -> list[str]:
    """The command line that runs `maverick-quant ARGS` with this interpreter."""
    return [sys.executable, "-m", "maverick_quant", *args]


def measured(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `command` (stdout and stderr to `log`); raises SystemExit naming the log if it fails.

    Returns {"wall_seconds", "peak_rss_mib" (ru_maxrss of the process, from wait4),
    "loadavg_1min": [at start, at end] (other work on the cores inflates the seconds), "command"}.
    """
    load_before, started = os.getloadavg()[0], time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(command)} exited {os.waitstatus_to_exitcode(status)}; see {log}")
    return {"wall_seconds": time.perf_counter() - started, "peak_rss_mib": usage.ru_maxrss / 1024,
            "loadavg_1min": [load_before, os.getloadavg()[0]], "command": command}


def cached_cost(out: Path, command: list[str], env: dict | None = None) -> dict:
    """`measured(command)` once: its figures are kept beside `out` (OUT.cost.json, the log in
    OUT.quantize.log) and read back by a rerun, which does not run `command` again."""
    cost = out.with_name(out.name + ".cost.json")
    if not cost.exists():
        cost.write_text(json.dumps(measured(command, out.with_name(out.name + ".quantize.log"), env), indent=2))
    return json.loads(cost.read_text())


def calibrate_once(model_dir: Path, work: Path, samples: int, seq_len: int) -> Path:
    """`maverick-quant calibrate` of `samples` x `seq_len` WikiText-2 validation windows (seed 0)
    into WORK/calib-SxL, unless it is there already; the folder."""
    calib = work / f"calib-{samples}x{seq_len}"
    if not calib.exists():
        subprocess.run(our_cli("calibrate", str(model_dir), "--data", str(DATA / "wiki.valid.tokens"), "--out",
                               str(calib), "--samples", str(samples), "--seq-len", str(seq_len), "--no-progress"),
                       check=True)
    return calib


def quantize_ours(model_dir: Path, calib: Path, out: Path, options: list[str]) -> dict:
    """`maverick-quant quantize MODEL --out OUT OPTIONS` on the CPU (once, `cached_cost`): the
    process's figures plus the bundle manifest's own ("tool_seconds", "tool_peak_rss_mib")."""
    from maverick_quant.bundle import Bundle

    from smollm2_quality import calib_options

    command = our_cli("quantize", str(model_dir), *calib_options(calib, options), "--out", str(out),
                      "--no-progress", "--force", "--device", "cpu", *options)
    cost = cached_cost(out, command)
    summary = Bundle(out).manifest["summary"]
    return {**cost, "tool_seconds": summary.get("seconds"), "tool_peak_rss_mib": summary.get("peak_rss_mib")}


def validate(model_dir: Path, candidate: Path, report: Path, windows: int, ctx: int = 512) -> tuple[dict | None, str]:
    """report.json of `maverick-quant validate` of `candidate` against `model_dir` on the first
    `windows` `ctx`-token windows of WikiText-2 raw test (once: a report there is read back),
    or None and the refusal (its output's tail). A run whose gates fail (exit 1) still counts."""
    if not (report / "report.json").exists():
        run = subprocess.run(our_cli("validate", "--reference", str(model_dir), "--candidate", str(candidate),
                                     "--data", str(DATA / "wiki.test.raw"), "--ctx", str(ctx),
                                     "--max-windows", str(windows), "--report", str(report), "--no-progress",
                                     "--device", "cpu", "--force"), capture_output=True, text=True)
        if run.returncode not in (0, 1) or not (report / "report.json").exists():
            return None, f"exit {run.returncode}: " + (run.stderr.strip() or run.stdout.strip())[-2000:]
    return json.loads((report / "report.json").read_text()), ""


def figures_of(report: dict) -> dict:
    """The figures a head-to-head table shows, from a validate report.json."""
    return {"ppl": report["candidate"]["ppl"], "ref_ppl": report["reference"]["ppl"],
            "ppl_ratio": report["candidate"]["ppl"] / report["reference"]["ppl"], "kl_mean": report["kl"]["mean"],
            "top1": report["top1_agreement"], "scored_tokens": report.get("tokens"),
            "validate_seconds": report.get("seconds")}
