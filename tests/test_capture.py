"""Hessian capture: plain inputs, and the attention-mixed inputs of value projections."""

from __future__ import annotations

import pytest
import torch

from maverick_quant.calibration.capture import HessianAccumulator, capture_attention_mixed, capture_inputs
from conftest import streaming_model_and_hidden


def _attention_output_sq_change(model, layer, hidden, name, delta) -> float:
    """mean over tokens of ||change of o_proj's input||^2 when `name`.weight += delta."""
    seen = []
    handle = layer.get_submodule("self_attn.o_proj").register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    model.run_layer(layer, hidden)
    layer.get_submodule(name).weight.data += delta
    model.run_layer(layer, hidden)
    layer.get_submodule(name).weight.data -= delta
    handle.remove()
    half = len(seen) // 2
    before, after = torch.cat(seen[:half]), torch.cat(seen[half:])
    return (after - before).double().square().sum(-1).mean().item()


def test_plain_hessian_is_mean_outer_product(tiny_llama_dir) -> None:
    model, hidden = streaming_model_and_hidden(tiny_llama_dir)
    layer = model.layer(0)
    inputs = []
    handle = layer.get_submodule("mlp.down_proj").register_forward_pre_hook(lambda _m, a: inputs.append(a[0].clone()))
    with capture_inputs(layer, ("mlp.down_proj",)) as accumulators:
        model.run_layer(layer, hidden)
    handle.remove()
    x = torch.cat(inputs).reshape(-1, 160).double()
    assert torch.allclose(accumulators["mlp.down_proj"].hessian().double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7)


def test_attention_mixed_hessian_predicts_the_attention_output_error(tiny_llama_dir) -> None:
    """tr(dW_g H_g dW_g^T) summed over KV heads, times the query heads per KV head, equals the
    mean squared change of the attention output: the value projection's exact objective."""
    model, hidden = streaming_model_and_hidden(tiny_llama_dir)
    layer = model.layer(1)
    config = model.config
    kv, repeat = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    with model.eager_attention(), capture_attention_mixed(layer, "self_attn.v_proj", "self_attn", kv) as accumulator:
        model.feed_layer(layer, hidden)
    H = accumulator.hessian().double()  # [kv, K, K]
    delta = torch.randn(layer.self_attn.v_proj.weight.shape, generator=torch.Generator().manual_seed(1)) * 1e-2
    per_head = delta.double().unflatten(0, (kv, -1))
    predicted = repeat * sum(torch.trace(per_head[g] @ H[g] @ per_head[g].T).item() for g in range(kv))
    measured = _attention_output_sq_change(model, layer, hidden, "self_attn.v_proj", delta)
    assert abs(predicted - measured) / measured < 1e-3


def test_eager_and_sdpa_layers_agree(tiny_llama_dir) -> None:
    model, hidden = streaming_model_and_hidden(tiny_llama_dir)
    layer = model.layer(2)
    sdpa = model.run_layer(layer, hidden)
    with model.eager_attention():
        eager = model.run_layer(layer, hidden)
    assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(sdpa, eager, atol=1e-5)


@pytest.mark.parametrize("length, width", [(6, 40), (40, 6)])  # the two evaluation orders
def test_add_mixed_equals_the_explicit_sum_of_mixed_outer_products(length, width) -> None:
    generator = torch.Generator().manual_seed(3)
    batch, kv, repeat = 2, 2, 3
    x = torch.randn(batch, length, width, generator=generator)
    probs = torch.softmax(torch.randn(batch, kv * repeat, length, length, generator=generator), -1)
    accumulator = HessianAccumulator(width, (kv,))
    accumulator.add_mixed(x, probs)
    z = probs.double() @ x.double().unsqueeze(1)  # [B, Hq, L, K]
    expected = torch.stack([
        sum(z[b, g * repeat + r].T @ z[b, g * repeat + r] for b in range(batch) for r in range(repeat)) for g in range(kv)
    ])
    assert accumulator.tokens == batch * repeat * length
    assert torch.allclose(accumulator.sum, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_llama4_dir"])
def test_one_pass_for_a_layers_groups_gives_each_groups_own_hessian(model_fixture, request) -> None:
    """`layer_hessians` (the statistics of --no-true-sequential) equals a `group_hessian` pass per
    group, bit for bit and with the same token counts, on dense layers (q/k, the attention-mixed
    v, o, gate/up, down) and on Llama 4's attention before an MoE block (chunked attention)."""
    from maverick_quant.groups import group_hessian, layer_hessians

    model, hidden = streaming_model_and_hidden(request.getfixturevalue(model_fixture), windows=3, length=24)
    passes = []
    feed_layer = model.feed_layer
    model.feed_layer = lambda *args, **kwargs: passes.append(1) or feed_layer(*args, **kwargs)
    for index in range(2):
        layer, groups = model.layer(index), model.plan(index).groups
        passes.clear()
        together = layer_hessians(model, layer, hidden, groups)
        assert len(together) == len(groups) and len(passes) == 2  # one pass for the plain groups, one for v's
        for group, (H, tokens) in zip(groups, together):
            alone, alone_tokens = group_hessian(model, layer, hidden, group)
            assert torch.equal(H, alone) and tokens == alone_tokens, group.name


def test_one_pass_refuses_groups_out_of_the_layers_order(tiny_llama_dir) -> None:
    """Hooked together, the pass stops at the last group's input: a group listed after one that
    runs later in the layer would miss windows, and is refused, not solved on part of them."""
    from maverick_quant.groups import layer_hessians

    model, hidden = streaming_model_and_hidden(tiny_llama_dir)
    layer, groups = model.layer(0), model.plan(0).groups
    down, attention_input = groups[-1], groups[0]
    assert down.linears == ("mlp.down_proj",) and not attention_input.mixed_by_attention
    with pytest.raises(RuntimeError, match="mlp.down_proj.*execution order"):
        layer_hessians(model, layer, hidden, (down, attention_input))
