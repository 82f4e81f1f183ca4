"""How fast the NaN/Inf check that every weight read and every layer's hidden states pass is.

`compress.finite.all_finite` (one torch.aminmax pass: both extremes finite) against the check it
replaced (`torch.isfinite(t).all()`, 1 Mi elements at a time), on fp32 and bf16 tensors of
`--mib` MiB each, with the time both would add to reading Maverick's weights (about 400 B bf16
parameters, every one read and checked once per quantize). Prints a Markdown table.

    python benchmarks/finite_check.py
"""

from __future__ import annotations

import argparse
import time

import torch

from maverick_quant.compress.finite import all_finite

MAVERICK_PARAMS = 400e9


def isfinite_all(tensor: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """The check before: a boolean copy per chunk, then all()."""
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(chunk))


def seconds_per_element(check, tensor: torch.Tensor, repeats: int) -> float:
    check(tensor)  # warm up
    started = time.perf_counter()
    for _ in range(repeats):
        assert check(tensor)
    return (time.perf_counter() - started) / repeats / tensor.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="size of each probe tensor")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| dtype | isfinite().all() ns/element | aminmax ns/element | speedup | Maverick's weights (bf16): before -> now |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        elements = args.mib * 2**20 // torch.tensor([], dtype=dtype).element_size()
        tensor = torch.randn(elements, generator=torch.Generator().manual_seed(0)).to(dtype)
        before = seconds_per_element(isfinite_all, tensor, args.repeats)
        now = seconds_per_element(all_finite, tensor, args.repeats)
        projected = f"{before * MAVERICK_PARAMS:,.0f} s -> {now * MAVERICK_PARAMS:,.0f} s" if dtype == torch.bfloat16 else ""
        print(f"| {str(dtype).removeprefix('torch.')} | {before * 1e9:.2f} | {now * 1e9:.3f} | {before / now:.0f}x | {projected} |")


if __name__ == "__main__":
    main()
