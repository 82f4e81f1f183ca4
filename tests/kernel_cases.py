"""Random 4-bit weights and routed inputs shared by the kernel tests."""

from __future__ import annotations

import torch

from maverick_quant.compress.types import QuantizedWeight


def random_quantized(n: int, k: int, group: int, symmetric: bool, experts: int | None = None,
                     seed: int = 0) -> QuantizedWeight:
    """Codes uniform in [0, 16), fp16 scales in [0.005, 0.025), zeros 8 (symmetric) or uniform;
    symmetric scales take either sign, as llama.cpp's Q4_0 rule (`--gguf-grid Q4_0`) makes them."""
    generator = torch.Generator().manual_seed(seed)
    lead = (experts,) if experts else ()
    codes = torch.randint(0, 16, lead + (n, k), generator=generator).to(torch.uint8)
    scales = (torch.rand(lead + (n, k // group), generator=generator) * 0.02 + 0.005).half()
    if symmetric:
        zeros = torch.full(lead + (n, k // group), 8, dtype=torch.uint8)
        scales = torch.where(torch.rand(scales.shape, generator=generator) < 0.5, -scales, scales)
    else:
        zeros = torch.randint(0, 16, lead + (n, k // group), generator=generator).to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, 4, group)


def routed_tokens(tokens: int, hidden: int, experts: int, top_k: int, seed: int = 0, skip_expert: int | None = None):
    """(x [T, D], choice [T, k], scores [T, k]) with Llama 4's routing on random logits;
    `skip_expert` gets no token (its logit is pushed down)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator)
    logits = torch.randn(tokens, experts, generator=generator)
    if skip_expert is not None:
        logits[:, skip_expert] = -1e4
    top_value, choice = logits.topk(top_k, dim=1)
    return x, choice, torch.sigmoid(top_value)
