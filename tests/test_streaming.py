"""The layer-by-layer forward reproduces transformers' whole-model logits."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from maverick_quant.streaming import StreamingModel, open_source


def _compare(model_dir, ids: torch.Tensor, batch: int) -> float:
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(ids).logits
    streamed = StreamingModel(open_source(model_dir), batch=batch).forward(ids)
    return (streamed - expected).abs().max().item() / expected.abs().max().item()


def test_streaming_equals_whole_model_tiny(tiny_llama_dir) -> None:
    ids = torch.randint(0, 1000, (5, 33), generator=torch.Generator().manual_seed(0))
    assert _compare(tiny_llama_dir, ids, batch=2) < 1e-5


def test_streaming_equals_whole_model_smollm2(smollm2_dir) -> None:
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    assert _compare(smollm2_dir, ids, batch=1) < 1e-4
