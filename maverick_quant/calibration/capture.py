"""Statistics collection with forward hooks: Hessians H = E[x x^T] of linear inputs.

Collecting is separate from solving: these accumulators only sum, the solvers in
compress/ take the finished H.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from maverick_quant.streaming import StopForward


class HessianAccumulator:
    """Running H = (1/n) sum_t x_t x_t^T over all tokens t of a linear's input.

    x arrives as [..., K]; each batch's x^T x is computed in fp32 (fast) and added to an
    fp64 running sum (stable over many batches); returned as fp32 [K, K].
    """

    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        self.sum += flat.T @ flat
        self.tokens += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        """H [K, K] fp32 (zeros when no token was seen)."""
        return (self.sum / max(self.tokens, 1)).float()


@contextlib.contextmanager
def capture_inputs(layer: torch.nn.Module, module_names: tuple[str, ...],
                   stop: bool = False) -> Iterator[dict[str, HessianAccumulator]]:
    """Accumulate input Hessians of `module_names` (paths in `layer`) while the block runs.

    Linears that share an input (q/k/v) each get their own hook; pass only one name per
    shared input to avoid redundant work. With `stop`, the last hooked module raises
    `StopForward` after accumulating, so the rest of the layer is not computed.
    """
    accumulators, handles = {}, []
    for position, name in enumerate(module_names):
        module = layer.get_submodule(name)
        accumulators[name] = acc = HessianAccumulator(module.in_features)
        halt = stop and position == len(module_names) - 1
        handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc, halt=halt: _record(acc, args[0], halt)))
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()


def _record(acc: HessianAccumulator, x: torch.Tensor, halt: bool) -> None:
    acc.add(x.detach())
    if halt:
        raise StopForward
