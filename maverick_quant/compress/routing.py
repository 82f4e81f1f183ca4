"""Grouping routed (token, slot) pairs by expert: the index math shared by calibration and the
MoE kernels (tensors in, tensors out)."""

from __future__ import annotations

import torch


def group_by_expert(choice: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """choice [T, k] chosen experts -> (order [T*k] flat (token, slot) pairs sorted by expert
    (stable), offsets [E+1]): expert e owns pairs order[offsets[e]:offsets[e+1]]; pair p is
    token p // k, slot p % k."""
    flat = choice.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, torch.cat([counts.new_zeros(1), counts.cumsum(0)])
