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
    fp64 running sum (stable over many batches); returned as fp32 [*batch, K, K] (batch is
    () for a plain linear, (kv_heads,) for attention-mixed inputs), on `device` (the layer's).
    """

    def __init__(self, in_features: int, batch: tuple[int, ...] = (), device: torch.device | str = "cpu"):
        self.sum = torch.zeros(*batch, in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        self.sum += flat.T @ flat
        self.tokens += flat.shape[0]

    def add_mixed(self, x: torch.Tensor, probs: torch.Tensor) -> None:
        """Attention-mixed inputs: x [B, L, K], probs [B, Hq, L, L] (query i, key j).

        z[b, h, i] = sum_j probs[b, h, i, j] x[b, j]; query heads are grouped by KV head
        (Hq = kv * r, consecutive heads share a KV head as in transformers' repeat_kv) and
        H[g] += sum over (b, r, i) of z z^T; tokens counts B * r * L per KV head.

        Per window, with P_g = probs of group g stacked [r*L, L], this sum is
        X^T (P_g^T P_g) X. Forming M_g = P_g^T P_g costs r L^2 + L K + K^2 per (g, row)
        against r L K + r K^2 for forming z explicitly; the cheaper order is used (for
        Maverick's K = 5120 the M form is about 3x cheaper).
        """
        kv = self.sum.shape[0]
        length, width = x.shape[1], x.shape[2]
        repeat = probs.shape[1] // kv
        via_m = mixing_first(repeat, length, width)
        for window_x, window_probs in zip(x, probs):  # one window at a time bounds memory
            window_x = window_x.float()
            stacked = window_probs.float().unflatten(0, (kv, repeat)).flatten(1, 2)  # [kv, r*L, L]
            if via_m:
                mixing = stacked.transpose(1, 2) @ stacked  # [kv, L, L]
                self.sum += window_x.T @ (mixing @ window_x)
            else:
                z = stacked @ window_x  # [kv, r*L, K]
                self.sum += z.transpose(1, 2) @ z
            self.tokens += repeat * length

    def hessian(self) -> torch.Tensor:
        """H [*batch, K, K] fp32 (zeros when no token was seen)."""
        return (self.sum / max(self.tokens, 1)).float()


def mixing_first(repeat: int, length: int, width: int) -> bool:
    """Whether `HessianAccumulator.add_mixed` forms M_g = P_g^T P_g first (see there)."""
    return repeat * length**2 + length * width + width**2 < repeat * length * width + repeat * width**2


def mixed_hessian_flops(kv: int, repeat: int, length: int, width: int) -> float:
    """Floating-point work of `add_mixed` for one window of `length` tokens: per KV head,
    M_g = P_g^T P_g (2 r L^3), M_g X (2 L^2 K) and X^T (M_g X) (2 L K^2), or z = P_g X
    (2 r L^2 K) and z^T z (2 r L K^2), whichever form it uses."""
    if mixing_first(repeat, length, width):
        return kv * (2 * repeat * length**3 + 2 * length**2 * width + 2 * length * width**2)
    return kv * (2 * repeat * length**2 * width + 2 * repeat * length * width**2)


@contextlib.contextmanager
def capture_inputs(layer: torch.nn.Module, module_names: tuple[str, ...], stop: bool = False,
                   make=lambda width, device: HessianAccumulator(width, device=device)
                   ) -> Iterator[dict[str, HessianAccumulator]]:
    """Accumulate input Hessians of `module_names` (paths in `layer`) while the block runs
    (or, with `make(in_features, device)`, any accumulator with an `add(x)` method), on the
    device of each module's weight.

    Linears that share an input (q/k/v) each get their own hook; pass only one name per
    shared input to avoid redundant work. With `stop`, the last hooked module raises
    `StopForward` after accumulating, so the rest of the layer is not computed.
    """
    accumulators, handles = {}, []
    for position, name in enumerate(module_names):
        module = layer.get_submodule(name)
        accumulators[name] = acc = make(module.in_features, module.weight.device)
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


@contextlib.contextmanager
def capture_attention_mixed(layer: torch.nn.Module, value_name: str, attention_name: str,
                            kv_heads: int) -> Iterator[HessianAccumulator]:
    """Per-KV-head Hessians of a value projection's attention-mixed input (see add_mixed).

    The value projection's pre-hook keeps its input; the attention module's forward hook
    (eager attention, which returns the probabilities) mixes it, then raises `StopForward`:
    nothing after the attention is needed. Run the layer with
    `StreamingModel.eager_attention()` active.
    """
    value, attention = layer.get_submodule(value_name), layer.get_submodule(attention_name)
    acc, stash = HessianAccumulator(value.in_features, (kv_heads,), value.weight.device), {}
    handles = [
        value.register_forward_pre_hook(lambda _m, args: stash.__setitem__("x", args[0].detach())),
        attention.register_forward_hook(lambda _m, _args, out: _mix_and_stop(acc, stash.pop("x"), out[1].detach())),
    ]
    try:
        yield acc
    finally:
        for handle in handles:
            handle.remove()


def _mix_and_stop(acc: HessianAccumulator, x: torch.Tensor, probs: torch.Tensor) -> None:
    acc.add_mixed(x, probs)
    raise StopForward


class ActivationSample:
    """mean |x| per input channel over every token, and an evenly strided sample of rows.

    x arrives as [..., K] batch by batch; rows whose running index is a multiple of
    `stride` are kept (fp32), so the sample spans all windows. Sums live on `device`.
    """

    def __init__(self, in_features: int, stride: int, device: torch.device | str = "cpu"):
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens, self.stride, self.rows = 0, stride, []

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum += flat.abs().sum(0).double()
        first = (-self.tokens) % self.stride
        self.rows.append(flat[first :: self.stride].clone())
        self.tokens += flat.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


def capture_samples(layer: torch.nn.Module, module_names: tuple[str, ...], stride: int, stop: bool = False):
    """`capture_inputs` with an ActivationSample (mean |x| and strided rows) per module."""
    return capture_inputs(layer, module_names, stop, make=lambda width, device: ActivationSample(width, stride, device))
