"""`plan`'s validation section against real `validate` runs: peak host memory and seconds.

For each case, in its own processes as a user runs them: `plan MODEL --method rtn
--validate-windows W --validate-ctx L --validate-batch B [--hellaswag-tasks N]`, then
`validate` of an RTN bundle of that model against it with the same settings. Prints the
planned and measured peak RSS (report.json's resources) and seconds, and their errors.

    python benchmarks/validation_plan.py --work /tmp/mq-vplan [--cases smollm2:8x512x4 moe:16x256x4 ...]
        [--hellaswag ../shared/data/hellaswag/hellaswag_val_full.txt] [--tasks 64]

Models: `smollm2` (SmolLM2-135M, dense, 30 layers, vocabulary 49152) and `moe` (a random
Llama 4: hidden 512, 8 experts of width 1024 top-1, 4 layers alternating dense and MoE, built
with SmolLM2's tokenizer). A case is MODEL:WINDOWSxCTXxBATCH, with `+hs` to add the HellaSwag
tasks. Run it alone: seconds are only comparable when nothing else shares the cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MIB = 2**20
MODELS = ("smollm2", "moe")


def cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "maverick_quant", *map(str, args)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def model_dir(work: Path, name: str) -> Path:
    """The model of a case, made once under `work`."""
    from maverick_quant.sources import smollm2_hf_dir

    if name == "smollm2":
        return smollm2_hf_dir()
    path = work / "llama4-e8-l4"
    if not path.exists():
        from maverick_quant.synthetic import random_llama4

        random_llama4(path, 8, layers=4, tokenizer_dir=smollm2_hf_dir())
    return path


def bundle_dir(work: Path, name: str, model: Path) -> Path:
    bundle = work / f"bundle-{name}"
    if not bundle.exists():
        cli("quantize", model, "--method", "rtn", "--out", bundle, "--no-progress", "--device", "cpu")
    return bundle


def measure(work: Path, case: str, args) -> dict:
    name, _, shape = case.partition(":")
    if name not in MODELS:
        raise SystemExit(f"case {case!r}: the model is one of {MODELS}")
    shape, hellaswag = shape.removesuffix("+hs"), shape.endswith("+hs")
    windows, ctx, batch = (int(v) for v in shape.split("x"))
    model = model_dir(work, name)
    bundle = bundle_dir(work, name, model)
    tasks = ["--hellaswag", args.hellaswag, "--hellaswag-tasks", args.tasks] if hellaswag else []  # both commands
    plan_json, report = work / f"plan-{case}.json", work / f"report-{case}"
    cli("plan", model, "--method", "rtn", "--device", "cpu", "--validate-windows", windows, "--validate-ctx", ctx,
        "--validate-batch", batch, "--validate-data", args.eval_text, *tasks, "--json", plan_json, "--force")
    cli("validate", "--reference", model, "--candidate", bundle, "--data", args.eval_text, "--ctx", ctx, "--max-windows",
        windows, "--batch", batch, *tasks, "--report", report, "--force", "--no-progress", "--device", "cpu")
    planned = json.loads(plan_json.read_text())["validation"]
    measured = json.loads((report / "report.json").read_text())
    seconds = measured["seconds"] + (measured["hellaswag"]["seconds"] if hellaswag else 0.0)
    return {"case": case, "planned_mib": planned["peak_host_bytes"] / MIB, "phase": planned["peak_host_phase"]["phase"],
            "measured_mib": measured["resources"]["peak_rss_mib"], "planned_s": planned["seconds"], "measured_s": seconds,
            "seconds_by_part": planned["seconds_by_part"]}


def table(rows: list[dict]) -> str:
    lines = ["| case | plan peak MiB (phase) | measured peak RSS MiB | error | plan s | measured s | error |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        memory = row["planned_mib"] / row["measured_mib"] - 1
        time = row["planned_s"] / row["measured_s"] - 1
        lines.append(f"| {row['case']} | {row['planned_mib']:.0f} ({row['phase']}) | {row['measured_mib']:.0f} | "
                     f"{memory:+.1%} | {row['planned_s']:.1f} | {row['measured_s']:.1f} | {time:+.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", default=["smollm2:8x512x4", "smollm2:8x512x4+hs", "moe:16x256x4",
                                                       "moe:64x256x8"])
    parser.add_argument("--text", type=Path, default=SHARED / "wikitext-2" / "wiki.valid.tokens", help="calibration text")
    parser.add_argument("--eval-text", type=Path, default=SHARED / "wikitext-2" / "wiki.test.raw")
    parser.add_argument("--hellaswag", type=Path, default=SHARED / "hellaswag" / "hellaswag_val_full.txt")
    parser.add_argument("--tasks", type=int, default=64)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        rows.append(measure(args.work, case, args))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
