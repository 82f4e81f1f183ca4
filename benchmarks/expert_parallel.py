"""Wall time of one process against torchrun's N processes on a synthetic Llama 4.

Uses (or builds) the random Llama 4 of benchmarks/moe_scaling.py (hidden 512, expert width
1024, one dense and one MoE layer) with `--experts` experts and its calibration, then times
`quantize` three ways: one process with 1 thread, one process with all threads, and
`torchrun --nproc-per-node N` (1 thread each, as torchrun sets). It checks that the
N-process bundle's tensor files equal the 1-thread single-process bundle's byte for byte.

    python benchmarks/expert_parallel.py --work /tmp/mq-moe [--experts 32] [--nproc 2] [--chunk-mib 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


def timed(command: list[str], threads: int | None) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def tensor_files(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*.safetensors"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--chunk-mib", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    from maverick_quant.sources import smollm2_hf_dir
    from maverick_quant.synthetic import random_llama4

    args.work.mkdir(parents=True, exist_ok=True)
    model, calib = args.work / f"llama4-e{args.experts}", args.work / "calib"
    if not model.exists():
        random_llama4(model, args.experts, tokenizer_dir=smollm2_hf_dir())
    python = [sys.executable]
    if not calib.exists():
        subprocess.run([*python, "-m", "maverick_quant", "calibrate", str(model), "--data", str(TEXT), "--samples",
                        str(args.samples), "--seq-len", str(args.seq_len), "--out", str(calib)], check=True)
    quantize = ["-m", "maverick_quant", "quantize", str(model), "--calib", str(calib), "--force", "--no-progress",
                "--moe-chunk-mib", str(args.chunk_mib), "--moe-min-tokens", "16", "--out"]
    out = {name: args.work / f"ep-{name}-e{args.experts}" for name in ("1thread", "threads", "torchrun")}
    seconds = {
        "1 process, 1 thread": timed([*python, *quantize, str(out["1thread"])], 1),
        f"1 process, {os.cpu_count()} threads": timed([*python, *quantize, str(out["threads"])], None),
        f"torchrun, {args.nproc} processes x 1 thread": timed(
            [*python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
             *quantize, str(out["torchrun"])], 1),
    }
    same = tensor_files(out["torchrun"]) == tensor_files(out["1thread"])
    print(f"\n{args.experts} experts, --moe-chunk-mib {args.chunk_mib}; torchrun bundle byte-identical to the "
          f"1-thread one: {same}\n\n| run | wall s | vs 1 process, 1 thread |\n|---|---|---|")
    base = seconds["1 process, 1 thread"]
    for name, value in seconds.items():
        print(f"| {name} | {value:.1f} | {base / value:.2f}x |")


if __name__ == "__main__":
    main()
