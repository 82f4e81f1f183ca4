"""Peak memory and time of per-expert GPTQ as the number of experts grows.

Builds random Llama 4 checkpoints (hidden 512, expert intermediate 1024, 2 layers: one
dense, one MoE) with 8, 16, 32 and 64 experts, quantizes each with GPTQ in its own process
on the same calibration windows with the same expert-chunk budget, and prints peak RSS,
seconds and seconds per expert. Streaming experts in chunks should keep peak RSS flat:
the goal is RSS(64) <= 1.3 x RSS(8).

    python benchmarks/moe_scaling.py --work /tmp/mq-moe [--experts 8 16 32 64] [--chunk-mib 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


def cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "maverick_quant", *map(str, args)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--experts", type=int, nargs="*", default=[8, 16, 32, 64])
    parser.add_argument("--chunk-mib", type=int, default=256)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    from maverick_quant.sources import smollm2_hf_dir
    from maverick_quant.synthetic import random_llama4

    args.work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for experts in args.experts:
        model = args.work / f"llama4-e{experts}"
        if not model.exists():
            random_llama4(model, experts, tokenizer_dir=smollm2_hf_dir())
        calib = args.work / "calib"
        if not calib.exists():
            cli("calibrate", model, "--data", TEXT, "--samples", args.samples, "--seq-len", args.seq_len, "--out", calib)
        bundle = args.work / f"bundle-e{experts}"
        cli("quantize", model, "--calib", calib, "--out", bundle, "--force", "--no-progress",
            "--moe-chunk-mib", args.chunk_mib, "--moe-min-tokens", 16)
        summary = json.loads((bundle / "manifest.json").read_text())["summary"]
        rows[experts] = summary
        print(json.dumps({experts: summary}), flush=True)
    base = rows[min(rows)]["peak_rss_mib"]
    print("\n| experts | peak RSS MiB | vs fewest | quantize s | s per expert |")
    print("|---|---|---|---|---|")
    for experts, summary in rows.items():
        print(f"| {experts} | {summary['peak_rss_mib']:.0f} | {summary['peak_rss_mib'] / base:.2f}x | "
              f"{summary['seconds']:.1f} | {summary['seconds'] / experts:.2f} |")


if __name__ == "__main__":
    main()
