"""NaN/Inf checks cheap enough for every weight read and every activation that passes.

A tensor holds no NaN or Inf exactly when its smallest and largest values are both finite: an
Inf is an extreme, and torch.aminmax propagates NaN. That is one pass over the tensor with
nothing allocated beside it, where `isfinite(t).all()` writes a boolean copy and reads it
again: on this 2-core CPU, idle, 2.2 ns against 0.07 ns per bf16 element (2.0 / 0.2 ns for
fp32), which over Maverick's 400 B weights, every one checked as it is read, is 886 s against
29 s (under a load of 4-5 per core: 57 ns against 0.4 ns). `python benchmarks/finite_check.py`.
"""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf anywhere in `tensor` (integer and empty tensors: True)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(low.isfinite() & high.isfinite())


def finite_each(tensor: torch.Tensor) -> torch.Tensor:
    """bool [B]: whether tensor[b] of `tensor` [B, ...] holds no NaN or Inf."""
    low, high = torch.aminmax(tensor.reshape(tensor.shape[0], -1), dim=-1)
    return low.isfinite() & high.isfinite()
