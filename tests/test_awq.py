"""AWQ math on synthetic layers: scale search, clipping, folding."""

from __future__ import annotations

import pytest
import torch

from maverick_quant.compress.awq import (candidate_scales, clip_weights, fold_into_norm, fold_into_previous_linear,
                                         output_loss, rtn_fake, scale_columns, search_scales)
from maverick_quant.recipe import AWQSpec, QuantSpec

SPEC = QuantSpec(bits=4, group_size=32, sym=False)


def _outlier_layer(seed: int = 0, tokens: int = 256, k: int = 128, n: int = 64):
    """Inputs with 4 channels 30x larger than the rest (as real activations have), random W."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, :4] *= 30
    return x, torch.randn(n, k, generator=g) * 0.05


def test_candidates_start_at_identity_and_are_normalised() -> None:
    x_mean = torch.rand(64) * 10 + 0.1
    scales = candidate_scales(x_mean, None, AWQSpec(grid=10))
    assert scales.shape == (10, 64) and torch.allclose(scales[0], torch.ones(64))
    assert torch.allclose(scales.amax(1) * scales.amin(1), torch.ones(10), atol=1e-5)
    assert (scales[5].argsort() == x_mean.argsort()).all()  # larger activations, larger scales
    duo = candidate_scales(x_mean, torch.rand(64) + 0.1, AWQSpec(grid=10, duo_scaling=True))
    assert duo.shape == (11, 64) and not torch.allclose(duo[1:], scales)  # s = 1 first, then the duo candidates


def test_scale_search_beats_rtn_on_a_layer_with_outlier_channels() -> None:
    x, W = _outlier_layer()
    awq = AWQSpec()
    loss = output_loss(x, [W], SPEC)
    result = search_scales(x.abs().mean(0), None, loss, awq)
    rtn_loss = (x @ (rtn_fake(W, SPEC) - W).T).square().sum() / x.shape[0]
    assert torch.isclose(result.losses[0], rtn_loss.double(), rtol=1e-4)  # alpha = 0 is plain RTN
    assert result.ratio > 0 and result.losses.min() < 0.7 * rtn_loss
    assert torch.equal(result.scales, candidate_scales(x.abs().mean(0), None, awq)[int(result.losses.argmin())])
    held_out, _ = _outlier_layer(seed=1)  # the chosen scales generalise to new inputs
    scaled = rtn_fake(scale_columns(W, result.scales), SPEC) / result.scales
    assert (held_out @ (scaled - W).T).square().sum() < (held_out @ (rtn_fake(W, SPEC) - W).T).square().sum()


def test_clipping_lowers_output_error_on_heavy_tailed_weights() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 128, generator=g)
    with torch.random.fork_rng():  # StudentT samples from the global generator: pin it, whatever ran before
        torch.manual_seed(2)
        W = torch.distributions.StudentT(2.0).sample((64, 128)) * 0.02
    clipped = clip_weights(W, x, SPEC, AWQSpec())
    error = lambda w: (x @ (rtn_fake(w, SPEC) - W).T).square().sum()  # noqa: E731
    assert error(clipped) < 0.98 * error(W)
    assert (clipped.abs() <= W.abs() + 1e-7).all()


def test_folding_preserves_the_float_function() -> None:
    g = torch.Generator().manual_seed(3)
    x, s = torch.randn(16, 32, generator=g), torch.rand(32, generator=g) + 0.5
    norm = torch.nn.RMSNorm(32, eps=1e-5)
    norm.weight.data = torch.rand(32, generator=g) + 0.5
    W = torch.randn(24, 32, generator=g)
    expected = norm(x) @ W.T
    norm.weight.data = fold_into_norm(norm.weight.data, s)
    assert torch.allclose(norm(x) @ scale_columns(W, s).T, expected, rtol=1e-5, atol=1e-5)
    up, down = torch.randn(32, 20, generator=g), torch.randn(8, 32, generator=g)
    h = torch.randn(16, 20, generator=g)
    assert torch.allclose((h @ fold_into_previous_linear(up, s).T) @ scale_columns(down, s).T, (h @ up.T) @ down.T,
                          rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [40, 128, 300])
def test_the_clip_search_picks_each_groups_best_clip_by_the_exact_output_error(tokens: int) -> None:
    """For every (row, group) the chosen clip's output error on the sample, sum_t (x_t,g . d_g)^2
    in fp64, is the least of all candidates' (to fp32 rounding): through the group second moments
    C_g = X_g^T X_g when the sample has more rows than a group is wide (128 and 300 > 64), through
    the sample itself otherwise (40); a K no group divides (200 = 3 groups of 64 and 8 columns)."""
    spec, awq = QuantSpec(bits=4, group_size=64), AWQSpec()
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 200, generator=g) * (torch.rand(200, generator=g) * 3)
    with torch.random.fork_rng():
        torch.manual_seed(tokens)
        W = torch.distributions.StudentT(2.5).sample((48, 200)) * 0.02

    def group_errors(clipped: torch.Tensor) -> torch.Tensor:  # [N, G] in fp64, straight from the definition
        d = torch.nn.functional.pad((rtn_fake(clipped, spec) - W).double(), (0, 56)).view(48, 4, 64)
        xg = torch.nn.functional.pad(x.double(), (0, 56)).view(tokens, 4, 64)
        return torch.einsum("tgw,ngw->tng", xg, d).square().sum(0)

    padded = torch.nn.functional.pad(W, (0, 56)).view(48, 4, 64)
    limit = padded.abs().amax(-1, keepdim=True)
    candidates = [group_errors(torch.maximum(torch.minimum(padded, limit * (1 - i / awq.clip_grid)),
                                             -limit * (1 - i / awq.clip_grid)).view(48, -1)[:, :200])
                  for i in range(int(awq.max_shrink * awq.clip_grid))]
    best = torch.stack(candidates).amin(0)
    chosen = group_errors(clip_weights(W, x, spec, awq))
    assert (chosen <= best * (1 + 1e-5) + 1e-12).all()
    assert (chosen < candidates[0] * (1 - 1e-3)).any()  # some groups are clipped for real


def test_clipping_in_row_blocks_matches_one_block() -> None:
    """The row-block memory bound does not change the result (the grid is per row)."""
    torch.manual_seed(3)
    W = torch.distributions.StudentT(3.0).sample((24, 128))
    x = torch.randn(40, 128)
    whole = clip_weights(W, x, SPEC, AWQSpec())
    blocked = clip_weights(W, x, SPEC, AWQSpec(), budget_elements=40 * SPEC.groups_for(128) * 5)  # 5 rows per block
    assert torch.equal(whole, blocked)


def test_expert_clipping_lowers_the_quantized_mlp_error() -> None:
    """clip_expert (gate/up on the expert's rows, down on the clipped hidden) brings the
    RTN-quantized gated MLP's output closer to the float one on heavy-tailed weights."""
    from maverick_quant.awq_moe import clip_expert
    from maverick_quant.calibration.moe import activation, expert_hidden
    from maverick_quant.recipe import QuantizeSpec

    torch.manual_seed(4)
    spec = QuantizeSpec(weights=SPEC)
    gate, up = (torch.distributions.StudentT(2.5).sample((96, 64)) * 0.05 for _ in range(2))
    down = torch.distributions.StudentT(2.5).sample((64, 96)) * 0.05
    rows, act = torch.randn(200, 64), activation("silu")

    def mlp_error(g, u, d) -> float:
        quantized = expert_hidden(rows, rtn_fake(g, SPEC), rtn_fake(u, SPEC), act) @ rtn_fake(d, SPEC).T
        return float((quantized - expert_hidden(rows, gate, up, act) @ down.T).square().mean())

    clipped = clip_expert(gate, up, down, rows, act, spec)
    assert mlp_error(*clipped) < 0.95 * mlp_error(gate, up, down)


def test_a_mixed_experts_awq_rows_weigh_its_errors_as_gptqs_mixed_hessian_does() -> None:
    """Under the `mixed` fallback an expert's AWQ losses weigh its routed tokens and the sampled
    ones at their would-be score as GPTQ's H_routed + mix * H_all does, for gate/up (on x) and
    for down (on act(x gate^T) * (x up^T)): the weighted rows' second moments, over the routed
    count, are GPTQ's Hessians. A weight put into x itself shrank down's sampled rows by ~w^2."""
    from maverick_quant.awq_moe import _expert_rows, _weighted_hidden
    from maverick_quant.calibration.moe import activation, expert_hidden, policy_hessian, route, sample_tokens
    from maverick_quant.recipe import ExpertPolicy, MoESpec, QuantizeSpec

    torch.manual_seed(5)
    x, router = torch.randn(300, 32), torch.randn(4, 32)
    router[3] *= 0.15  # expert 3 is routed few tokens
    routing = route(x, router, 1)
    n = int(routing.counts[3])
    assert 0 < n < 40
    spec = QuantizeSpec(weights=SPEC, moe=MoESpec(policy=ExpertPolicy.MIXED, mix=0.3))
    sample = sample_tokens(x.shape[0], spec.awq.sample_tokens)
    rows, weights = _expert_rows(x, routing, 3, sample, ExpertPolicy.MIXED, spec)
    tokens, scores = routing.tokens_of(3)
    routed, every = x[tokens] * scores[:, None], x[sample] * torch.sigmoid(routing.logits[sample, 3])[:, None]
    gate, up, act = torch.randn(48, 32) * 0.2, torch.randn(48, 32) * 0.2, activation("silu")

    def second_moment(a: torch.Tensor) -> torch.Tensor:
        return a.T.double() @ a.double() / n

    weighted_x = rows * weights[:, None]
    torch.testing.assert_close(second_moment(weighted_x), policy_hessian(ExpertPolicy.MIXED, routed, every, spec.moe, 32).double(),
                               rtol=1e-5, atol=1e-6)
    gptq_down = policy_hessian(ExpertPolicy.MIXED, expert_hidden(routed, gate, up, act), expert_hidden(every, gate, up, act),
                               spec.moe, 48).double()
    torch.testing.assert_close(second_moment(_weighted_hidden(rows, gate, up, act, weights)), gptq_down, rtol=1e-5, atol=1e-6)


def test_the_moe_block_search_quantizes_its_candidates_a_few_at_a_time_with_the_same_outputs() -> None:
    """Gate/up under 7 candidate scales, 3 at a time (a ragged last chunk) or all at once: the
    same routed outputs; the float pass (no scales) is unchanged by chunking."""
    from maverick_quant.awq_moe import BlockSample, _routed_outputs
    from maverick_quant.recipe import QuantizeSpec, QuantSpec

    generator = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts = 40, 64, 32, 3
    sample = BlockSample(torch.randn(tokens, hidden, generator=generator),
                         torch.randint(0, experts, (tokens, 1), generator=generator),
                         torch.rand(tokens, 1, generator=generator))
    weights = {"gate_proj": torch.randn(experts, inter, hidden, generator=generator) * 0.1,
               "up_proj": torch.randn(experts, inter, hidden, generator=generator) * 0.1,
               "down_proj": torch.randn(experts, hidden, inter, generator=generator) * 0.1}
    scales = torch.rand(7, hidden, generator=generator) + 0.5
    spec = QuantizeSpec(weights=QuantSpec(bits=4, group_size=32))
    act = torch.nn.functional.silu
    whole = _routed_outputs(sample, weights, 0, act, scales, spec, chunk=7)
    assert whole.shape == (7, tokens, hidden) and whole.abs().sum() > 0
    torch.testing.assert_close(_routed_outputs(sample, weights, 0, act, scales, spec, chunk=3), whole)
    torch.testing.assert_close(_routed_outputs(sample, weights, 0, act, None, spec, chunk=3),
                               _routed_outputs(sample, weights, 0, act, None, spec, chunk=7))
    assert not torch.allclose(whole[0], whole[6])  # the candidates differ, so a mixed-up chunk would show


@pytest.mark.parametrize("bits,group,sym,signed,clip", [(4, 128, True, False, False), (4, 32, False, False, False),
                                                        (4, 64, True, True, False), (8, 128, True, False, False),
                                                        (4, -1, False, False, False), (4, 32, True, False, True)])
def test_the_fused_rounding_equals_the_bundles_rounding_bit_for_bit(bits, group, sym, signed, clip) -> None:
    """rtn_fake (the searches' fused quantize-dequantize) gives exactly what the bundle stores and
    reads back, rtn_quantize(W).dequantize(): leading candidate dims, a K no group divides
    (576 = 4.5 groups of 128), an all-zero row, and llama.cpp's offset grids (Q4_K, Q4_1)."""
    from maverick_quant.compress.grid import rtn_quantize

    W = torch.randn(3, 24, 576, generator=torch.Generator().manual_seed(bits + group)) * 0.05
    W[0, 0] = 0
    spec = QuantSpec(bits=bits, group_size=group, sym=sym, signed_scale=signed, clip_search=clip)
    assert torch.equal(rtn_fake(W, spec), rtn_quantize(W, spec).dequantize())
    for offset in (QuantSpec(bits=4, group_size=32, sym=False, k_quant=True), QuantSpec(bits=4, group_size=32, sym=False,
                                                                                          free_min=True)):
        W = torch.randn(2, 8, 512, generator=torch.Generator().manual_seed(1))
        assert torch.equal(rtn_fake(W, offset), rtn_quantize(W, offset).dequantize())


def test_duo_scaling_keeps_plain_rtn_among_its_candidates() -> None:
    """With duo scaling alpha = 0 is 1 / mean|w|, not s = 1: s = 1 is added as the first candidate,
    so the search never ends worse than RTN and its `rtn_loss` is RTN's own loss."""
    x, W = _outlier_layer(seed=3)
    awq = AWQSpec(grid=10, duo_scaling=True)
    w_mean = W.abs().mean(0) + 0.01
    candidates = candidate_scales(x.abs().mean(0), w_mean, awq)
    assert candidates.shape == (11, 128) and torch.equal(candidates[0], torch.ones(128))
    result = search_scales(x.abs().mean(0), w_mean, output_loss(x, [W], SPEC), awq)
    rtn_loss = (x @ (rtn_fake(W, SPEC) - W).T).square().sum() / x.shape[0]
    assert result.rtn_loss == pytest.approx(float(rtn_loss), rel=1e-4) and result.losses.min() <= result.rtn_loss
    assert result.ratio is None or result.ratio == (int(result.losses.argmin()) - 1) / 10


def test_duo_scalings_weight_mean_is_normalised_per_group() -> None:
    """mean|w| for duo scaling: each weight over the largest magnitude of its own group (as AWQ's
    reference computes it), then averaged over the rows."""
    from maverick_quant.compress.awq import duo_weight_mean

    W = torch.randn(6, 96, generator=torch.Generator().manual_seed(4))
    W[:, 40] = 50.0  # one huge column: per row it would flatten every other group
    grouped = W.abs().view(6, 3, 32)
    expected = (grouped / (grouped.amax(-1, keepdim=True) + 1e-6)).view(6, 96).mean(0)
    torch.testing.assert_close(duo_weight_mean([W[:2], W[2:]], QuantSpec(group_size=32)), expected)


def test_a_linear_kept_in_float_adds_no_error_to_the_scale_search() -> None:
    x, W = _outlier_layer(seed=5)
    kept = torch.randn(32, 128, generator=torch.Generator().manual_seed(6))
    scales = candidate_scales(x.abs().mean(0), None, AWQSpec(grid=5))
    torch.testing.assert_close(output_loss(x, [W, kept], [SPEC, None])(scales), output_loss(x, [W], SPEC)(scales))


def test_q4_k_clipping_never_leaves_a_super_block_worse_than_unclipped() -> None:
    """Q4_K's 8 groups share a super-block's d and dmin: per-group clip choices, put together,
    could make groups worse than no clipping at all (measured up to 8.6x); every (row,
    super-block) is now at most its unclipped error."""
    from maverick_quant.compress.awq import _group_errors, group_inputs

    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 512, generator=g)
    W = torch.randn(64, 512, generator=g) * 0.01
    W[:, ::37] *= 40  # outlier columns
    spec = QuantSpec(group_size=32, sym=False, k_quant=True)
    clipped = clip_weights(W, x, spec, AWQSpec())
    inputs = group_inputs(x, spec)

    def block_errors(weight: torch.Tensor) -> torch.Tensor:
        delta = (rtn_fake(weight, spec) - W).view(64, 16, 32)
        return _group_errors(delta, inputs).view(64, 2, 8).sum(-1)

    assert (block_errors(clipped) <= block_errors(W) * (1 + 1e-5)).all()
    assert block_errors(clipped).sum() < block_errors(W).sum()  # and clipping still helps overall


def test_awq_clips_neither_q_nor_k(tiny_llama_dir) -> None:
    """q and k reach the model through q.k, not their own outputs: AWQ's clip search leaves them
    (as the reference implementations do) and clips v and the MLP (this tiny model's grouped KV
    heads leave o_proj in no scale group: it is rounded to nearest, docs/awq.md)."""
    from maverick_quant.awq_layer import clip_layer
    from maverick_quant.recipe import Method, QuantizeSpec
    from maverick_quant.streaming import StreamingModel, open_source

    model = StreamingModel(open_source(tiny_llama_dir), batch=2)
    hidden = model.embed(torch.randint(3, 49152, (4, 32), generator=torch.Generator().manual_seed(0)))
    layer = model.layer(0)
    before = {name: layer.get_submodule(name).weight.clone() for name in ("self_attn.q_proj", "self_attn.k_proj",
                                                                           "self_attn.v_proj", "mlp.gate_proj")}
    clip_layer(model, layer, hidden, model.plan(0), QuantizeSpec(method=Method.AWQ, weights=SPEC), stride=1)
    unchanged = {name: torch.equal(weight, layer.get_submodule(name).weight) for name, weight in before.items()}
    assert unchanged == {"self_attn.q_proj": True, "self_attn.k_proj": True, "self_attn.v_proj": False,
                         "mlp.gate_proj": False}


@pytest.mark.parametrize("tokens,rows", [(100, 100), (1536, 1536), (2047, 2047), (2048, 1024), (262_144, 1024)])
def test_the_dense_searches_sample_as_many_rows_as_plan_prices(tokens: int, rows: int) -> None:
    """The stride max(1, T // 1024) keeps ceil(T / stride) rows, up to 2047 of them: plan priced min(1024, T).
    The rows counted are those the searches' own sampler keeps, fed in uneven batches as windows come."""
    from maverick_quant.awq_layer import _stride
    from maverick_quant.calibration.capture import ActivationSample
    from maverick_quant.compress.awq import sampled_rows

    assert sampled_rows(tokens, 1024) == rows
    hidden = torch.zeros(1, tokens, 1)
    sampler = ActivationSample(1, _stride(hidden, 1024))
    for batch in torch.arange(tokens, dtype=torch.float32).unsqueeze(-1).split(37):
        sampler.add(batch)
    assert sampler.sample.shape[0] == rows
