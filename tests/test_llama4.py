"""Llama 4: the architecture table, the Maverick preset, streaming with chunked attention,
and the calibration-time MoE forward against transformers' own `Llama4TextMoe`."""

from __future__ import annotations

import math

import pytest
import torch

from maverick_quant.arch.base import FusedExpertsBuilder, unfuse_experts
from maverick_quant.arch.llama4 import LLAMA4, maverick_config, moe_block
from maverick_quant.calibration.moe import activation, route, routed_forward
from maverick_quant.checkpoint import Checkpoint
from maverick_quant.streaming import StreamingModel, open_source


def test_table_names_every_text_tensor_of_a_saved_model(tiny_llama4_dir) -> None:
    checkpoint = Checkpoint(tiny_llama4_dir)
    expected = LLAMA4.expected_tensors(checkpoint.load_config())
    stored = set(checkpoint.tensors)
    assert set(expected) <= stored
    assert all(name.startswith(LLAMA4.passthrough_prefixes) for name in stored - set(expected))
    open_source(tiny_llama4_dir)  # validates shapes and dtypes of the whole index


def test_maverick_preset_has_the_published_layout() -> None:
    config = maverick_config()
    text = config.text_config
    shapes = LLAMA4.expected_tensors(config)
    prefix = "language_model.model.layers.1.feed_forward."
    assert shapes[prefix + "experts.gate_up_proj"] == (128, 5120, 16384)
    assert shapes[prefix + "experts.down_proj"] == (128, 8192, 5120)
    assert shapes[prefix + "router.weight"] == (128, 5120)
    assert shapes["language_model.model.layers.0.feed_forward.gate_proj.weight"] == (16384, 5120)
    assert shapes["language_model.lm_head.weight"] == (202048, 5120)
    assert len(text.moe_layers) == 24 and text.moe_layers[0] == 1
    total = sum(math.prod(shape) for shape in shapes.values())
    assert 395e9 < total < 405e9  # "400B parameters"
    expert_bytes = 2 * sum(math.prod(shapes[prefix + f"experts.{n}"]) for n in ("gate_up_proj", "down_proj"))
    assert abs(expert_bytes / 1e9 - 32.2) < 0.1  # one MoE layer's experts in bf16


def test_unfuse_and_the_fused_builder_are_inverse_and_follow_the_llama4_slicing() -> None:
    moe = moe_block(maverick_config(hidden_size=8, intermediate_size=6, num_local_experts=3).text_config)
    fused = {"feed_forward.experts.gate_up_proj": torch.randn(3, 8, 12), "feed_forward.experts.down_proj": torch.randn(3, 6, 8)}
    unfused = unfuse_experts(moe, fused)
    assert torch.equal(unfused["gate_proj"][1], fused["feed_forward.experts.gate_up_proj"][1][:, :6].T)
    assert torch.equal(unfused["up_proj"][2], fused["feed_forward.experts.gate_up_proj"][2][:, 6:].T)
    assert torch.equal(unfused["down_proj"][0], fused["feed_forward.experts.down_proj"][0].T)
    builder = FusedExpertsBuilder(moe, 3)  # pieces of one or two experts, in any order
    for name in ("down_proj", "up_proj", "gate_proj"):
        builder.add(name, 1, unfused[name][1:])
        builder.add(name, 0, unfused[name][:1])
    assert builder.fused.keys() == fused.keys() and all(torch.equal(fused[k], v) for k, v in builder.fused.items())
    assert all(t.is_contiguous() for t in builder.fused.values())


def test_streaming_equals_the_whole_model_across_attention_chunks(tiny_llama4_dir) -> None:
    """40-token windows cross the 16-token attention chunks: the streamed layers must apply
    the chunked mask exactly as transformers' whole model does."""
    from transformers import Llama4ForConditionalGeneration

    ids = torch.randint(3, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    model = Llama4ForConditionalGeneration.from_pretrained(tiny_llama4_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    streamed = StreamingModel(open_source(tiny_llama4_dir), batch=1).forward(ids)
    assert (streamed - expected).abs().max() < 1e-4


def test_calibration_moe_forward_equals_transformers(tiny_llama4_dir) -> None:
    """Our routed forward (experts touch only their routed tokens, score on the input) plus
    the shared expert equals `Llama4TextMoe.forward`, on routing that is uneven."""
    source = open_source(tiny_llama4_dir)
    model = StreamingModel(source)
    layer = model.layer(1)
    block = layer.feed_forward
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = block(x)
        routing = route(x, block.router.weight, block.top_k)
        moe = model.plan(1).moe
        experts = unfuse_experts(moe, source.expert_tensors(1, 0, moe.num_experts))
        ours = routed_forward(x, routing, experts, activation(moe.activation), out=block.shared_expert(x))
    counts = routing.counts
    assert counts.sum() == 300 and counts.max() > 1.8 * counts.float().mean() and counts[0] < 0.15 * counts.float().mean()
    assert (ours - expected).abs().max() <= 1e-5


def test_expert_slices_are_read_without_the_rest(tiny_llama4_dir) -> None:
    source = open_source(tiny_llama4_dir)
    full = source.layer_tensors(3)["feed_forward.experts.down_proj"]
    part = source.expert_tensors(3, 2, 3)["feed_forward.experts.down_proj"]
    assert torch.equal(part, full[2:5])
    assert "feed_forward.experts.down_proj" not in source.layer_tensors(3, experts=False)


def test_expert_chunks_fit_the_budget_for_maverick() -> None:
    from maverick_quant.errors import InputError
    from maverick_quant.experts import experts_per_chunk

    text = maverick_config().text_config
    moe = moe_block(text)
    assert experts_per_chunk(moe, text.hidden_size, text.intermediate_size, 8192) == 3
    try:
        experts_per_chunk(moe, text.hidden_size, text.intermediate_size, 2048)
    except InputError as exc:
        assert "--moe-chunk-mib 2048" in str(exc)
    else:
        raise AssertionError("a budget below one expert must be refused")


def test_a_published_config_with_attn_temperature_tuning_4_is_read_as_on(tiny_llama4_dir, tmp_path) -> None:
    """Meta's Llama 4 configs write `attn_temperature_tuning: 4`, which transformers 5's strict
    config refuses: it is read as true (what it means), the bundle equals the one made from the
    same model with `true`, and an export's config.json writes `true`; a config transformers
    cannot read at all is an error naming the file, not a traceback."""
    import json
    import shutil

    from conftest import run_cli

    model = tmp_path / "published"
    shutil.copytree(tiny_llama4_dir, model)
    config = json.loads((model / "config.json").read_text())
    assert config["text_config"]["attn_temperature_tuning"] is True
    config["text_config"]["attn_temperature_tuning"] = 4
    (model / "config.json").write_text(json.dumps(config))
    assert open_source(model).config.text_config.attn_temperature_tuning is True
    for source, out in ((tiny_llama4_dir, tmp_path / "b-true"), (model, tmp_path / "b-4")):
        code, output = run_cli("quantize", source, "--method", "rtn", "--out", out, "--no-progress")
        assert code == 0, output
    for layer in sorted((tmp_path / "b-true" / "layers").glob("*.safetensors")):
        assert layer.read_bytes() == (tmp_path / "b-4" / "layers" / layer.name).read_bytes(), layer.name
    code, output = run_cli("export", tmp_path / "b-4", "--format", "gptq", "--out", tmp_path / "gptq")
    assert code == 0, output
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["text_config"]["attn_temperature_tuning"] is True
    config["text_config"]["hidden_size"] = "wide"
    (model / "config.json").write_text(json.dumps(config))
    code, output = run_cli("quantize", model, "--method", "rtn", "--out", tmp_path / "b-bad", "--no-progress")
    assert code == 2 and f"{model / 'config.json'}: cannot be read as a transformers config" in output, output


def test_a_chunk_budget_below_one_expert_is_refused_before_the_first_layer(tiny_llama4_dir, tmp_path, monkeypatch) -> None:
    """It was found in the first MoE layer, after the dense layers before it were quantized
    (Maverick: layer 1), and took them along."""
    from click.testing import CliRunner

    import maverick_quant.experts as experts
    import maverick_quant.pipeline as pipeline
    from maverick_quant.cli import cli
    from maverick_quant.errors import InputError

    def too_small(moe, hidden, inter, budget_mib):
        raise InputError(f"--moe-chunk-mib {budget_mib}: one expert needs more; raise the budget")

    monkeypatch.setattr(experts, "experts_per_chunk", too_small)
    monkeypatch.setattr(pipeline, "quantize_layer_rtn", lambda *args: pytest.fail("a layer was quantized"))
    result = CliRunner().invoke(cli, ["quantize", str(tiny_llama4_dir), "--method", "rtn", "--out", str(tmp_path / "b"),
                                      "--moe-chunk-mib", "3", "--no-progress"])
    assert result.exit_code == 2 and "--moe-chunk-mib 3: one expert needs more" in result.output, result.output
    assert not any(tmp_path.iterdir())
