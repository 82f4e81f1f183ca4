"""How much distinct text calibration windows see: random (GPTQ's convention) vs disjoint.

    python benchmarks/window_coverage.py MODEL_DIR DATA [--sizes 128x512,128x2048,512x2048]

Tokenizes DATA with MODEL_DIR's tokenizer as `calibrate` does, draws the windows of each size
(seed 0) with `calibration.data.draw_windows`, and prints the share of drawn positions that are
distinct, per drawing.
"""

from __future__ import annotations

import argparse

import torch

from maverick_quant.calibration.data import draw_windows, load_tokenizer, token_stream
from maverick_quant.calibration.records import read_records
from maverick_quant.errors import InputError
from maverick_quant.recipe import WINDOW_DRAWS, CalibSpec


def distinct_share(total: int, spec: CalibSpec) -> str:
    """The share of the windows' positions that are distinct, over a text of `total` tokens."""
    try:
        positions = draw_windows(torch.arange(total), spec, "text")
    except InputError:
        return f"refused: needs {spec.samples * spec.seq_len:,} tokens"
    return f"{positions.unique().numel() / positions.numel():.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("data")
    parser.add_argument("--sizes", default="128x512,128x2048,512x2048", help="SAMPLESxSEQ_LEN, comma-separated")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model_dir)
    total = token_stream(read_records(args.data, tokenizer, False), tokenizer).numel()
    print(f"{args.data}: {total:,} tokens")
    print("| windows | " + " | ".join(WINDOW_DRAWS) + " |\n|---|" + "---:|" * len(WINDOW_DRAWS))
    for size in args.sizes.split(","):
        samples, seq_len = (int(part) for part in size.split("x"))
        shares = [distinct_share(total, CalibSpec(samples=samples, seq_len=seq_len, windows=mode)) for mode in WINDOW_DRAWS]
        print(f"| {samples} x {seq_len} | " + " | ".join(shares) + " |")


if __name__ == "__main__":
    main()
