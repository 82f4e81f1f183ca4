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


def test_a_bf16_stream_keeps_the_rope_frequencies_in_fp32(tiny_llama_dir) -> None:
    """The rotary module's inv_freq was cast with the model dtype: in bf16 RoPE's angle was off by
    0.4 rad at position 1000 (transformers keeps inv_freq in fp32 and computes angles in fp32)."""
    model = StreamingModel(open_source(tiny_llama_dir), dtype=torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    hidden = torch.zeros(1, 1000, 8, dtype=torch.bfloat16)
    cos, _ = model._position_embeddings(hidden, None)
    exact = torch.cos(999 * model.rotary.inv_freq.double())
    assert (cos[0, -1, : exact.numel()].double() - exact).abs().max() < 1e-2  # bf16 output rounding only


def test_a_config_with_linear_biases_is_refused_naming_the_key(tiny_llama_dir) -> None:
    """attention_bias: true used to fail at layer 0 with 'missing tensors' (a ValueError)."""
    import pytest
    from transformers import AutoConfig

    from maverick_quant.arch.registry import table_for
    from maverick_quant.errors import InputError

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.attention_bias = True
    with pytest.raises(InputError, match=r"model/config.json: attention_bias: true is not supported"):
        table_for(config, "model/config.json")
