"""The SmolLM2-upcycled Llama 4: with routed experts silenced it is SmolLM2."""

from __future__ import annotations

import torch

from maverick_quant.streaming import StreamingModel, open_source
from maverick_quant.synthetic import interleave_rotary_rows, upcycle_to_llama4


def test_interleaving_pairs_rotate_half_rows() -> None:
    rows = torch.arange(8.0)[:, None]  # one head of 8: rotate-half pairs (0,4) (1,5) (2,6) (3,7)
    assert interleave_rotary_rows(rows, heads=1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_upcycled_model_with_silent_experts_reproduces_smollm2(smollm2_dir, tmp_path) -> None:
    out = upcycle_to_llama4(smollm2_dir, tmp_path / "up", num_experts=4, moe_every=8, expert_scale=0.0)
    source = open_source(out)
    assert source.config.architectures == ["Llama4ForCausalLM"] and source.config.moe_layers == [1, 9, 17, 25]
    ids = torch.randint(3, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    expected = StreamingModel(open_source(smollm2_dir)).forward(ids)
    assert (StreamingModel(source).forward(ids) - expected).abs().max() < 1e-3
