"""True-sequential GPTQ keeps the inputs of a layer's attention output projection once its
q/k/v are solved, and replays them to the later passes (attention_replay.py): the same results
bit for bit, with the attention computed in o's pass only, not again in gate/up's, down's and
the output pass (in an MoE layer: the pass to its block)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from maverick_quant.attention_replay import AttentionReplay
from maverick_quant.pipeline import quantize_groups_gptq, quantize_layer_gptq
from maverick_quant.recipe import QuantizeSpec, QuantSpec
from conftest import streaming_model_and_hidden


def _attention_computed(layer: torch.nn.Module, attention: str) -> list[int]:
    """A list that grows by one each time the attention's q projection really runs."""
    calls: list[int] = []
    layer.get_submodule(f"{attention}.q_proj").register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_llama4_dir"])
@pytest.mark.parametrize("keep_float,solved,replayed_passes", [((), 7, 3), (("o_proj",), 6, 2), (("self_attn",), 3, 2)])
def test_a_dense_layer_quantized_with_replay_is_the_same_bit_for_bit(model_fixture, keep_float, solved,
                                                                     replayed_passes, request) -> None:
    """Layer 0 (dense; Llama 4's with chunked attention of 16 tokens in 24-token windows), 3
    windows in batches of 2: with replay, the codes of every linear and the layer's output
    equal those of the passes that compute the attention again, and the attention runs twice
    (2 batches) less in each replayed pass: gate/up's, down's and the output pass after o's
    pass kept the inputs; down's and the output pass after gate/up's kept them, where o (or
    the whole attention) stays in float."""
    from maverick_quant.groups import mark_linears

    model, hidden = streaming_model_and_hidden(request.getfixturevalue(model_fixture), length=24)
    spec = QuantizeSpec(weights=QuantSpec(bits=4, group_size=32), keep_float=keep_float)
    attention, prefix, names = model.table.attention, model.table.prefix(0), model.plan(0).linears
    replayed_layer, replayed_hidden = model.layer(0), hidden.clone()
    mark_linears(replayed_layer, prefix, names, spec)
    replayed_calls = _attention_computed(replayed_layer, attention)
    replayed, _ = quantize_layer_gptq(model, 0, replayed_layer, replayed_hidden, spec, None)

    computed_layer, computed_hidden = model.layer(0), hidden.clone()
    mark_linears(computed_layer, prefix, names, spec)
    computed_calls = _attention_computed(computed_layer, attention)
    computed, _ = quantize_groups_gptq(model, computed_layer, computed_hidden, model.plan(0).groups, spec)
    model.run_layer(computed_layer, computed_hidden, out=computed_hidden)

    assert replayed.keys() == computed.keys() and len(replayed) == solved
    for name in replayed:
        assert torch.equal(replayed[name].codes, computed[name].codes), name
        assert torch.equal(replayed[name].scales, computed[name].scales), name
    assert torch.equal(replayed_hidden, computed_hidden)
    assert len(computed_calls) - len(replayed_calls) == replayed_passes * 2


def test_a_replay_serves_exactly_the_recorded_windows(tiny_llama_dir) -> None:
    """Replayed passes must go through the kept windows, all of them, in order; a pass that did
    not see every window keeps nothing."""
    model, hidden = streaming_model_and_hidden(tiny_llama_dir, length=24)
    layer = model.layer(0)
    table = model.table
    replay = AttentionReplay(layer.get_submodule(table.attention), layer.get_submodule(table.attention_output),
                             hidden.shape[0])
    with replay.recording():
        model.feed_layer(layer, hidden[:2])
    assert replay.inputs is None
    with pytest.raises(RuntimeError, match="no attention inputs were kept"):
        with replay.replaying():
            pass
    with replay.recording():
        expected = model.run_layer(layer, hidden)
    assert replay.inputs is not None and replay.inputs.shape == hidden.shape  # tiny Llama: heads x head_dim = hidden
    with replay.replaying():
        assert torch.equal(model.run_layer(layer, hidden), expected)
    with pytest.raises(RuntimeError, match="went through 2 of the 3 kept windows"):
        with replay.replaying():
            model.run_layer(layer, hidden[:2])
    with pytest.raises(RuntimeError, match="asked for windows 2..3 of 3 kept"):
        with replay.replaying():
            model.run_layer(layer, torch.cat([hidden, hidden[:1]]))
    assert "forward" not in vars(replay.attention)  # the module's own forward is back after each replay


@pytest.mark.parametrize("method,replayed", [("gptq", 3 + 1 + 3 + 1), ("awq+gptq", 3 + 1 + 3 + 1)])
def test_a_llama4_bundle_is_the_same_with_and_without_replay(method, replayed, tiny_llama4_dir, small_text_file,
                                                             tmp_path, monkeypatch) -> None:
    """The whole tiny Llama 4 (dense layers 0 and 2, MoE layers 1 and 3), quantized with the
    replay and without it: every tensor of the two bundles is the same. GPTQ replays 3 passes
    in a dense layer (gate/up, down, output) and 1 in an MoE layer (to its block), after AWQ's
    scaling too."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from maverick_quant.cli import cli

    replays = []
    replaying = AttentionReplay.replaying
    monkeypatch.setattr(AttentionReplay, "replaying", lambda self: replays.append(1) or replaying(self))

    def quantize(out):
        result = CliRunner().invoke(cli, ["quantize", str(tiny_llama4_dir), "--data", str(small_text_file), "--samples",
                                          "3", "--seq-len", "24", "--batch", "2", "--group-size", "32", "--method",
                                          method, "--out", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output

    quantize(tmp_path / "replayed")
    assert len(replays) == replayed
    monkeypatch.setattr(AttentionReplay, "around_pass", lambda self: contextlib.nullcontext())
    monkeypatch.setattr(AttentionReplay, "replaying_if_kept", lambda self: contextlib.nullcontext())
    quantize(tmp_path / "computed")
    files = sorted(path.relative_to(tmp_path / "replayed") for path in (tmp_path / "replayed").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(tmp_path / "computed") for p in (tmp_path / "computed").rglob("*.safetensors"))
    for name in files:
        replayed, computed = load_file(tmp_path / "replayed" / name), load_file(tmp_path / "computed" / name)
        assert replayed.keys() == computed.keys()
        assert all(torch.equal(replayed[key], computed[key]) for key in replayed), name
