"""How much the size of `mixed`'s all-token sample matters when it is below a projection's K.

A starved expert under `--moe-policy mixed` (or the `mixed` fallback) is solved on
H = H_routed + mix * H_all, H_all a mean over T_s sampled tokens. With T_s < K (the old
4096-row default against Maverick's down_proj, K = 8192) H has rank <= n_routed + T_s < K and
GPTQ fixes the weights' action on the rest by damping alone. This script builds one expert's
down projection input h = silu(x W_g^T) * (x W_u^T) from correlated Gaussian x (hidden D, expert
width K = I), solves GPTQ on the `mixed` Hessian for several T_s, and prints the relative output
error ||(W - Q) h||^2 / ||W h||^2 on held-out tokens the solve never saw, beside RTN's.

    python benchmarks/mixed_sample_rank.py [--hidden 1024] [--inter 6144] [--routed 64] [--held-out 4096] [--shift 0]

Random weights and inputs, not Maverick's: the figures show the mechanism, not Maverick's numbers.
"""

from __future__ import annotations

import argparse
import time

import torch

from maverick_quant.calibration.moe import AUTO_SAMPLE_FLOOR, mean_outer
from maverick_quant.compress.gptq import gptq_quantize
from maverick_quant.compress.grid import rtn_quantize
from maverick_quant.recipe import QuantSpec


def expert_inputs(tokens: int, hidden: int, gate: torch.Tensor, up: torch.Tensor, mixing: torch.Tensor,
                  generator: torch.Generator, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Down's input h [tokens, I] for correlated inputs x = z @ mixing (+ offset: the tokens the
    router sends this expert, a cluster of their own), z standard normal."""
    x = torch.randn(tokens, hidden, generator=generator) @ mixing
    if offset is not None:
        x = x + offset
    return torch.nn.functional.silu(x @ gate.T) * (x @ up.T)


def held_out_error(W: torch.Tensor, Q: torch.Tensor, h: torch.Tensor) -> float:
    """||(W - Q) h||^2 / ||W h||^2 over the rows of h [n, K]."""
    return float(((h @ (W - Q).T).square().sum() / (h @ W.T).square().sum()).item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=6144, help="the expert width K of down_proj (Maverick: 8192)")
    parser.add_argument("--routed", type=int, default=64, help="routed tokens of the starved expert")
    parser.add_argument("--held-out", type=int, default=4096)
    parser.add_argument("--mix", type=float, default=0.1)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--shift", type=float, default=0.0,
                        help="routed (and held-out) tokens offset from the rest by this norm (0: one distribution)")
    parser.add_argument("--samples", type=int, nargs="*", help="the sample sizes T_s tried (default: 4096 and 2 K)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    D, K = args.hidden, args.inter
    mixing = torch.linalg.qr(torch.randn(D, D, generator=g))[0] * torch.linspace(1.0, 0.05, D)  # decaying spectrum
    gate, up = torch.randn(K, D, generator=g) / D**0.5, torch.randn(K, D, generator=g) / D**0.5
    W = torch.randn(D, K, generator=g) / K**0.5  # down_proj [D, K]
    spec = QuantSpec(bits=4, group_size=args.group_size, sym=True)
    offset = torch.randn(D, generator=g)
    offset = offset / offset.norm() * args.shift if args.shift else None
    routed = expert_inputs(args.routed, D, gate, up, mixing, g, offset)
    held = expert_inputs(args.held_out, D, gate, up, mixing, g, offset)  # what the expert will be routed
    print(f"down_proj W [{D}, {K}], 4-bit sym g{args.group_size}, {args.routed} routed tokens, mix {args.mix}, "
          f"{args.held_out} held-out tokens, routed cluster offset {args.shift}")
    print(f"rtn: relative held-out output error {held_out_error(W, rtn_quantize(W, spec).dequantize(), held):.5f}")
    for sample in args.samples or sorted({AUTO_SAMPLE_FLOOR, 2 * K}):
        started = time.perf_counter()
        every = expert_inputs(sample, D, gate, up, mixing, g)
        H = mean_outer(routed, K) + args.mix * mean_outer(every, K)
        result = gptq_quantize(W, H, spec)
        error = held_out_error(W, result.weight.dequantize(), held)
        rank = int(torch.linalg.matrix_rank(H, rtol=1e-5).item())  # H is fp32: below that is rounding
        print(f"mixed, T_s = {sample:>6}: rank(H) {rank:>6} of {K}, damp {float(result.damp.max()):.3g}, "
              f"relative held-out output error {error:.5f} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
