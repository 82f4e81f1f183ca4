"""GPTQ's factor U (upper Cholesky of (H + damp I)^-1), two ways, timed and checked against fp64.

- before: L = cholesky(H), A^-1 = cholesky_inverse(L), U = cholesky(A^-1, upper)
- now (`compress.gptq._try_inverse_cholesky`): L = cholesky(J H J), U = J L^-1 J (J reverses the
  indices; one triangular solve, no second factorization)

on Hessians of random activations (4K tokens, damp 0.01) at SmolLM2's and Maverick's widths,
and on ill-conditioned ones (fewer tokens than K, columns scaled over four decades). Prints a
Markdown table: milliseconds per factor, and each one's error against the fp64 factor.

    python benchmarks/inverse_cholesky.py
    python benchmarks/inverse_cholesky.py --widths 576 1536 5120 8192
"""

from __future__ import annotations

import argparse
import time

import torch

from maverick_quant.compress.gptq import _try_inverse_cholesky


def before(H: torch.Tensor) -> torch.Tensor:
    L, _ = torch.linalg.cholesky_ex(H)
    return torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)[0]


def now(H: torch.Tensor) -> torch.Tensor:
    return _try_inverse_cholesky(H, torch.zeros(H.shape[0], dtype=H.dtype))[0]


def hessian(k: int, tokens: int, column_scales: torch.Tensor | None, damp: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(k + tokens)
    X = torch.randn(1, tokens, k, generator=generator) * (1.0 if column_scales is None else column_scales)
    H = X.transpose(1, 2) @ X / tokens
    H.diagonal(dim1=-2, dim2=-1).add_(damp * H.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True))
    return H


def timed(factor, H: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    U = factor(H)  # warm up
    started = time.perf_counter()
    for _ in range(repeats):
        U = factor(H)
    return (time.perf_counter() - started) / repeats, U


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="*", default=[576, 1536, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| K | Hessian | before ms | now ms | speedup | before: error vs fp64 | now: error vs fp64 |")
    print("|---|---|---|---|---|---|---|")
    for k in args.widths:
        cases = {"4K tokens, damp 0.01": hessian(k, 4 * k, None, 0.01),
                 "K/3 tokens, scaled columns, damp 1e-4": hessian(k, k // 3, torch.logspace(-3, 1, k), 1e-4)}
        for name, H in cases.items():
            exact = before(H.double())
            error = lambda U: f"{float((U.double() - exact).norm() / exact.norm()):.1e}"  # noqa: E731
            old_seconds, old = timed(before, H, args.repeats)
            new_seconds, new = timed(now, H, args.repeats)
            print(f"| {k} | {name} | {old_seconds * 1e3:.0f} | {new_seconds * 1e3:.0f} | "
                  f"{old_seconds / new_seconds:.1f}x | {error(old)} | {error(new)} |")


if __name__ == "__main__":
    main()
