"""Peak memory of tokenizing a long plain text in one tokenizer call against in pieces
(calibration.data.record_ids), and whether the pieces give the ids of one call.

    python benchmarks/tokenize_memory.py TOKENIZER_DIR TEXT [--repeat 10]

Each way runs in its own process (peak RSS added: ru_maxrss after, less before); the text is
TEXT repeated --repeat times. Prints tokens, MiB and seconds per way, then the id check with
pieces of 20,000 characters on TEXT itself.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(tokenizer_dir: str, text_file: str, way: str) -> None:
    """One way ("whole" or "pieces") in this process: prints tokens, MiB added and seconds."""
    from transformers import AutoTokenizer

    from maverick_quant.calibration import data, records

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if way == "whole":
        data.PIECE_CHARS = 1 << 62
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    stream = data.token_stream(records.read_records(Path(text_file), tokenizer, False), tokenizer)
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"{way}: {stream.numel()} tokens, peak RSS added {added:.0f} MiB, {time.perf_counter() - started:.1f} s")


def same_ids(tokenizer_dir: str, text_file: str) -> bool:
    import torch
    from transformers import AutoTokenizer

    from maverick_quant.calibration import data

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = Path(text_file).read_text(encoding="utf-8")
    data.PIECE_CHARS = 20_000
    return torch.cat(data.record_ids(text, tokenizer)).tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer_dir")
    parser.add_argument("text")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--way", choices=["whole", "pieces"], help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.way:
        measure(args.tokenizer_dir, args.text, args.way)
        return
    with tempfile.TemporaryDirectory() as folder:
        long_text = Path(folder) / "long.txt"
        long_text.write_text(Path(args.text).read_text(encoding="utf-8") * args.repeat, encoding="utf-8")
        print(f"{long_text.stat().st_size / 1e6:.1f} MB of text")
        for way in ("whole", "pieces"):
            subprocess.run([sys.executable, __file__, args.tokenizer_dir, str(long_text), "--way", way], check=True)
    print(f"pieces of 20,000 characters give the ids of one call on {args.text}: {same_ids(args.tokenizer_dir, args.text)}")


if __name__ == "__main__":
    main()
