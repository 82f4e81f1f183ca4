"""Validation measures each routed expert on the reference's routed inputs, and the routing
agreement of the two models (validation/experts.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from maverick_quant.calibration.moe import activation, route, routed_forward
from maverick_quant.streaming import open_source
from maverick_quant.validation.evaluate import evaluate
from maverick_quant.validation.experts import (ExpertError, compare_expert_chunk, routing_agreement,
                                               summarize_experts)

LENGTH = 24
PREFIX = "language_model.model.layers"


def _windows(count: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 49152, (count, LENGTH), generator=torch.Generator().manual_seed(seed))


def _edited_copy(source: Path, out: Path, edits: dict) -> Path:
    """A copy of the model directory `source` with tensors replaced: edits {checkpoint name:
    function of the stored tensor}; shards, index and shapes unchanged."""
    shutil.copytree(source, out)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name, edit in edits.items():
        shard = out / weight_map[name]
        tensors = load_file(shard)
        tensors[name] = edit(tensors[name]).contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


def _experts(count: int, hidden: int, inter: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"gate_proj": (count, inter, hidden), "up_proj": (count, inter, hidden), "down_proj": (count, hidden, inter)}
    return {name: torch.randn(shape, generator=generator) / hidden**0.5 for name, shape in shapes.items()}


def test_each_expert_is_compared_on_its_routed_inputs_and_the_reference_block_is_computed() -> None:
    """err_e from its definition, an expert without tokens unmeasured, and `out` gaining exactly
    what routed_forward adds for the reference experts."""
    tokens, hidden, inter, experts = 40, 16, 8, 4
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=generator)
    x[:, 0] = 3.0
    router = torch.randn(experts, hidden, generator=generator)
    router[:, 0] = torch.tensor([5.0, 5.0, 5.0, -5.0])  # expert 3's logit is -15 + noise: never chosen
    routing = route(x, router, 1)
    assert routing.counts[3] == 0 and (routing.counts[:3] > 0).all()
    reference, candidate = _experts(experts, hidden, inter, 1), _experts(experts, hidden, inter, 2)
    x_cand = x * 1.5
    out = torch.zeros_like(x)
    errors = compare_expert_chunk(7, x, x_cand, routing, reference, candidate, activation("silu"), 0, out)

    assert torch.allclose(out, routed_forward(x, routing, reference, activation("silu")), atol=1e-6)
    assert [(e.layer, e.expert, e.tokens) for e in errors] == [(7, e, int(routing.counts[e])) for e in range(experts)]
    assert errors[3].rel_error is None
    for expert in range(3):
        picked, scores = routing.tokens_of(expert)
        def output(w, inputs):
            act = torch.nn.functional.silu(inputs @ w["gate_proj"][expert].T) * (inputs @ w["up_proj"][expert].T)
            return act @ w["down_proj"][expert].T
        y_ref = output(reference, x[picked] * scores[:, None])
        y_cand = output(candidate, x_cand[picked] * scores[:, None])
        expected = (y_cand - y_ref).square().sum() / y_ref.square().sum()
        assert errors[expert].rel_error == pytest.approx(expected.item(), rel=1e-5)


def test_routing_agreement_counts_shared_choices_per_slot() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0], [0.0, 1.0, 2.0, 3.0], [5.0, 0.0, 0.0, 4.0]])
    other = torch.tensor([[2.0, 3.0, 0.0, -1.0], [3.0, 2.0, 0.0, -5.0], [5.0, 0.0, 4.0, 0.0]])
    eye = torch.eye(4)
    top2 = route(logits, eye, 2), route(other, eye, 2)
    assert routing_agreement(*top2) == pytest.approx(3 / 6)  # {0,1}={1,0}; {3,2} vs {0,1}; {0,3} vs {0,2}
    assert routing_agreement(route(logits, eye, 1), route(other, eye, 1)) == pytest.approx(1 / 3)
    assert routing_agreement(top2[0], top2[0]) == 1.0


def test_the_worst_expert_is_taken_over_experts_with_enough_tokens() -> None:
    errors = [ExpertError(1, 0, 3, 9.0, 1.0), ExpertError(1, 1, 20, 1.0, 10.0), ExpertError(1, 2, 0, 0.0, 0.0),
              ExpertError(3, 0, 16, 3.0, 10.0)]
    summary = summarize_experts(errors, min_tokens=16)
    assert summary["count"] == 4 and summary["measured"] == 3
    assert summary["rel_error"]["max"] == pytest.approx(0.3)
    assert (summary["rel_error"]["max_layer"], summary["rel_error"]["max_expert"]) == (3, 0)
    assert summary["rel_error"]["pooled"] == pytest.approx(13 / 21)
    assert summary["rel_error"]["median"] == pytest.approx(0.3)  # of 0.1, 0.3 and 9.0
    assert [row["rel_error"] for row in summary["per_expert"]][2] is None


@pytest.mark.parametrize("broken", [float("nan"), float("inf")])
def test_a_broken_expert_is_the_max_whatever_its_token_count(broken: float) -> None:
    """An expert whose output overflowed (NaN or inf error) with fewer than min_tokens tokens was
    left out of the max: experts.rel_error.max<=0.1 passed with the max at 0.0."""
    from maverick_quant.validation.gates import evaluate_gates, parse_gate

    errors = [ExpertError(1, 0, 40, 1.0, 100.0), ExpertError(1, 1, 13, broken, 10.0)]
    summary = summarize_experts(errors, min_tokens=16)
    assert summary["rel_error"]["max_expert"] == 1 and not summary["rel_error"]["max"] < math.inf
    assert not evaluate_gates([parse_gate("experts.rel_error.max<=0.1")], {"experts": summary})[0].passed


def test_one_changed_expert_is_the_only_expert_with_error(tiny_llama4_dir: Path, tmp_path: Path) -> None:
    """A candidate equal to the reference but for expert 5 of layer 3: every other expert, and
    every layer before 3, measures exactly zero error; routing agrees everywhere (the streams
    differ only after layer 3's experts)."""
    def perturb(down: torch.Tensor) -> torch.Tensor:
        down = down.clone()
        down[5] += 0.1 * torch.randn(down[5].shape, generator=torch.Generator().manual_seed(0))
        return down

    candidate = _edited_copy(tiny_llama4_dir, tmp_path / "cand", {f"{PREFIX}.3.feed_forward.experts.down_proj": perturb})
    result = evaluate(open_source(tiny_llama4_dir), open_source(candidate), _windows(), show_progress=False,
                      expert_chunk_mib=1)
    experts = result.summary["experts"]
    assert experts["count"] == 16
    changed = [(r["layer"], r["expert"]) for r in experts["per_expert"] if r["rel_error"]]
    assert changed == [(3, 5)]
    assert [layer["rel_error"] for layer in result.summary["layers"][:3]] == [0.0, 0.0, 0.0]
    assert result.summary["layers"][3]["rel_error"] > 0
    assert result.summary["routing"]["agreement"]["min"] == 1.0
    assert result.summary["routing"]["agreement_local"]["min"] == 1.0


def test_a_scale_folded_into_the_candidates_norm_is_applied_before_its_experts(tiny_llama4_dir: Path,
                                                                               tmp_path: Path) -> None:
    """AWQ folds a block scale s into the norm before the MoE block (norm / s, router, shared
    gate/up and expert gate/up columns * s): the same function. The experts are then compared
    on each model's own block input, so they measure no error (they would if the candidate's
    experts were fed the reference's input)."""
    scale = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.5
    layer = f"{PREFIX}.1"
    edits = {f"{layer}.post_attention_layernorm.weight": lambda w: w / scale,
             f"{layer}.feed_forward.router.weight": lambda w: w * scale,
             f"{layer}.feed_forward.shared_expert.gate_proj.weight": lambda w: w * scale,
             f"{layer}.feed_forward.shared_expert.up_proj.weight": lambda w: w * scale,
             f"{layer}.feed_forward.experts.gate_up_proj": lambda w: w * scale[None, :, None]}
    candidate = _edited_copy(tiny_llama4_dir, tmp_path / "scaled", edits)
    result = evaluate(open_source(tiny_llama4_dir), open_source(candidate), _windows(), show_progress=False)
    errors = [r["rel_error"] for r in result.summary["experts"]["per_expert"] if r["layer"] == 1]
    assert len(errors) == 8 and max(errors) < 1e-9
    assert result.summary["layers"][1]["rel_error"] < 1e-9


def test_experts_beat_rtn_on_held_out_tokens_only_with_enough_calibration_tokens(tiny_llama4_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """What the per-expert error is for: with 16 x 40 calibration tokens (about 80 per expert,
    most routed Hessians rank-deficient against the widths 64 and 32) GPTQ's experts do no
    better than RTN's on held-out text, with 64 x 40 they do clearly better (measured 0.031 /
    0.028 / 0.021 pooled error; docs/moe.md). The MoE layers' errors, dominated by attention
    and the shared expert, fall in both cases and do not show it."""
    from tests.test_moe_quantize import _text, run

    calibration, held_out = _text(tmp_path, "wiki.valid.tokens"), _text(tmp_path, "wiki.test.raw")
    pooled = {}
    gptq = ["--moe-min-tokens", 8, "--data", calibration, "--seq-len", 40]
    for name, options in {"rtn": ["--method", "rtn"], "gptq-16": [*gptq, "--samples", 16],
                          "gptq-64": [*gptq, "--samples", 64]}.items():
        run("quantize", tiny_llama4_dir, *options, "--group-size", 32,
            "--out", tmp_path / name, "--no-progress")
        run("validate", "--reference", tiny_llama4_dir, "--candidate", tmp_path / name, "--data", held_out,
            "--ctx", 40, "--max-windows", 30, "--report", tmp_path / f"report-{name}", "--no-progress")
        pooled[name] = json.loads((tmp_path / f"report-{name}" / "report.json").read_text())["experts"]["rel_error"]["pooled"]
    assert pooled["gptq-64"] < 0.85 * pooled["rtn"]  # (gptq-16 measured 1.10x RTN's: not asserted, a better
    # starved-expert policy may lower it)
    assert pooled["gptq-64"] < 0.85 * pooled["gptq-16"]
