"""GPTQ and the RTN grid: exactness where they must agree, quality where GPTQ must win, robustness."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from maverick_quant.compress.gptq import gptq_quantize, gptq_quantize_each, identity_solve
from maverick_quant.compress.grid import (
    CLIP_GRID,
    CLIP_MAX_SHRINK,
    CLIP_NORM,
    FP16_TINY,
    expand_groups,
    fake_quantize,
    group_params,
    quant_params,
    quantize_codes,
    rtn_quantize,
    search_params,
)
from maverick_quant.errors import InputError
from maverick_quant.recipe import Method, QuantizeSpec, QuantSpec


def _correlated_hessian(k: int, tokens: int, seed: int) -> torch.Tensor:
    """H = X^T X / T for X = Z @ A: inputs mixed by a random matrix, so columns correlate."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, k, generator=gen)
    A = torch.randn(k, k, generator=gen) / k**0.5
    X = Z @ A
    return X.T @ X / tokens


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def _loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr((W - Q) H (W - Q)^T) over the last two dims, in fp64."""
    E = (W - Q).double()
    return ((E @ H.double()) * E).sum(dim=(-2, -1))


def _assert_same_grid(a, b) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)
    assert (a.bits, a.group_size) == (b.bits, b.group_size)


# ---- grid ---------------------------------------------------------------------------------


def test_quant_params_scales_are_fp16_exact_and_safe():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 50, generator=gen) * torch.logspace(-8, 2, 64).unsqueeze(1)
    w[3] = 0.0  # degenerate row
    for bits in (2, 4, 8):
        for sym in (True, False):
            scale, zero = quant_params(w, bits, sym)
            assert scale.dtype == torch.float32 and scale.shape == (64,)
            assert torch.equal(scale.half().float(), scale)
            assert (scale >= FP16_TINY).all() and torch.isfinite(scale).all()
            assert torch.equal(zero, zero.round()) and ((zero >= 0) & (zero <= 2**bits - 1)).all()
            if sym:
                assert (zero == 2 ** (bits - 1)).all()
            assert scale[3] == torch.tensor(2.0 / (2**bits - 1)).half().float()


def test_rtn_grid_error_is_at_most_half_a_step():
    W = _weight(32, 200, seed=1)
    spec = QuantSpec(bits=4, group_size=64, sym=False)
    qw = rtn_quantize(W, spec)
    assert qw.codes.dtype == torch.uint8 and qw.scales.dtype == torch.float16 and qw.zeros.dtype == torch.uint8
    assert qw.scales.shape == (32, 4) and qw.zeros.shape == (32, 4)  # 200 = 3 * 64 + 8
    step = expand_groups(qw.scales.float(), 200, 64)
    assert ((qw.dequantize() - W).abs() <= step / 2 * (1 + 1e-5)).all()
    scales, zeros = group_params(W, spec)
    assert torch.equal(quant_params(W[:, 192:], 4, False)[0], scales[:, 3])  # short last group
    assert torch.equal(
        fake_quantize(W[:, :64], scales[:, :1], zeros[:, :1], 15), qw.dequantize()[:, :64]
    )


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=64, sym=False), QuantSpec(bits=4, group_size=128),
                                  QuantSpec(bits=8, group_size=-1), QuantSpec(bits=4, group_size=32, signed_scale=True)])
def test_rtn_codes_on_the_grouped_view_equal_per_column_rounding(spec):
    """rtn_quantize rounds on the grouped view; the codes are those of the per-column formula
    clamp(round(w / s_col) + z_col, 0, maxq) bit for bit (a short last group, batch dims)."""
    W = torch.randn(2, 16, 200, generator=torch.Generator().manual_seed(5)) * 0.03
    scales, zeros = group_params(W, spec)
    per_column = quantize_codes(W, expand_groups(scales, 200, spec.group_size), expand_groups(zeros, 200, spec.group_size),
                                spec.maxq)
    assert torch.equal(rtn_quantize(W, spec).codes, per_column.to(torch.uint8))


def _norm_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """sum |w - q(w)|^CLIP_NORM per row of w [..., N, C] on the per-row grid (scale, zero) [..., N]."""
    return (fake_quantize(w, scale[..., None], zero[..., None], maxq) - w).abs().pow(CLIP_NORM).sum(-1)


@pytest.mark.parametrize("sym,signed", [(True, False), (True, True), (False, False)])
def test_clip_search_takes_each_rows_best_shrink_of_the_range(sym, signed):
    """search_params equals a row-by-row brute force over the shrink factors (first best kept),
    never does worse than min/max in its norm on any row, and does better over all rows."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 32, generator=gen) * torch.rand(24, 1, generator=gen)
    w[5] = 0.0
    w[7, 3] = 6.0  # an outlier
    scale, zero = search_params(w, 4, sym, signed_scale=signed)
    for row in range(w.shape[0]):
        tries = [quant_params(w[row : row + 1], 4, sym, signed_scale=signed, shrink=1 - i / CLIP_GRID)
                 for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID))]
        errors = torch.stack([_norm_error(w[row : row + 1], s, z, 15) for s, z in tries]).squeeze(1)
        best = int(torch.argmin(errors))  # the first of equal errors, as search_params keeps it
        assert (scale[row], zero[row]) == (tries[best][0][0], tries[best][1][0]), row
    plain = _norm_error(w, *quant_params(w, 4, sym, signed_scale=signed), 15)
    searched = _norm_error(w, scale, zero, 15)
    others = torch.arange(w.shape[0]) != 7  # the outlier's row is better left unclipped, and dominates the sum
    assert (searched <= plain).all() and searched[others].sum() < 0.97 * plain[others].sum()
    assert torch.equal(scale.half().float(), scale) and torch.isfinite(scale).all() and scale[5] != 0


def test_clip_search_runs_inside_gptq_and_is_refused_on_llama_cpp_offset_grids():
    """GPTQ with clip_search has less loss than without on heavy-tailed weights (its groups'
    ranges are searched on the error-updated weights, each column weighted by H_kk), and the
    flag is refused where llama.cpp's own Q4_K/Q4_1 range search applies."""
    torch.manual_seed(4)  # StudentT samples from the global generator
    W = torch.distributions.StudentT(3.0).sample((48, 128)) * 0.02
    H = _correlated_hessian(128, 512, seed=5)
    losses = {}
    for clip in (False, True):
        spec = QuantSpec(bits=4, group_size=32, clip_search=clip)
        losses[clip] = float(_loss(W, gptq_quantize(W, H, spec).weight.dequantize(), H))
    assert losses[True] < losses[False], losses
    # the first group is searched before any error update, weighted by the inputs' energy diag(H)
    first = gptq_quantize(W, H, QuantSpec(bits=4, group_size=32, clip_search=True)).weight.scales[:, 0].float()
    weighted = search_params(W[:, :32], 4, True, importance=torch.diagonal(H)[:32])[0]
    assert torch.equal(first, weighted) and not torch.equal(first, search_params(W[:, :32], 4, True)[0])
    with pytest.raises(InputError, match="clip_search.*Q4_K"):
        QuantSpec(bits=4, group_size=32, sym=False, k_quant=True, clip_search=True)
    with pytest.raises(InputError, match="clip_search with method awq"):
        QuantizeSpec(method=Method.AWQ, weights=QuantSpec(clip_search=True))


def test_group_params_shapes():
    W = torch.randn(2, 8, 576)
    assert group_params(W, QuantSpec(group_size=128))[0].shape == (2, 8, 5)
    assert group_params(W, QuantSpec(group_size=-1))[0].shape == (2, 8, 1)


# ---- GPTQ exactness -----------------------------------------------------------------------


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("diagonal", ["identity", "random"])
def test_diagonal_hessian_gives_rtn(sym, group_size, act_order, diagonal):
    """Uncorrelated inputs leave nothing to compensate: GPTQ must reproduce RTN bit for bit
    (a random diagonal also makes act-order permute the columns)."""
    W = _weight(24, 200, seed=2)
    spread = torch.rand(200, generator=torch.Generator().manual_seed(3)) + 0.1
    H = torch.eye(200) if diagonal == "identity" else torch.diag(spread)
    spec = QuantSpec(bits=4, group_size=group_size, sym=sym, act_order=act_order, block_size=48)
    result = gptq_quantize(W, H, spec)
    _assert_same_grid(result.weight, rtn_quantize(W, spec))
    assert result.damp.shape == () and result.damp == spec.damp


_IDENTITY_GRIDS = [QuantSpec(bits=4, group_size=128), QuantSpec(bits=4, group_size=32, sym=False),
                   QuantSpec(bits=4, group_size=64, act_order=True), QuantSpec(bits=8, group_size=128),
                   QuantSpec(bits=4, group_size=-1, sym=False), QuantSpec(bits=4, group_size=32, clip_search=True),
                   QuantSpec(bits=3, group_size=128, sym=False, act_order=True, clip_search=True),
                   QuantSpec(bits=4, group_size=64, signed_scale=True),
                   QuantSpec(bits=4, group_size=32, sym=False, k_quant=True),
                   QuantSpec(bits=4, group_size=32, sym=False, free_min=True)]


@pytest.mark.parametrize("spec", _IDENTITY_GRIDS, ids=lambda s: f"{s.bits}b-g{s.group_size}-{s.sym}-{s.act_order}-"
                         f"{s.clip_search}-{s.signed_scale}-{s.k_quant}-{s.free_min}")
@pytest.mark.parametrize("k", [512, 576])
def test_identity_solve_is_gptq_against_the_identity_bit_for_bit(spec, k):
    """The closed form that `rtn` experts and AWQ's rounding use equals the full solve against
    H = I in every stored tensor and in the audit's loss, rel_loss and damp: batched, a K no
    group divides (576; Q4_K then falls back to Q4_1's grid), an all-zero row, a block size
    that cuts groups, W a transposed view (as an expert's slice of a fused [E, K, N] tensor is)."""
    W = (torch.randn(3, k, 40, generator=torch.Generator().manual_seed(k + spec.bits)) * 0.05).transpose(1, 2)
    W[0, 0] = 0
    solved = gptq_quantize(W, torch.eye(k).expand(3, k, k), dataclasses.replace(spec, block_size=48))
    closed = identity_solve(W, spec)
    for field in ("codes", "scales", "zeros", "super_scales", "super_mins"):
        a, b = getattr(solved.weight, field), getattr(closed.weight, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    for stat in ("loss", "rel_loss", "damp"):
        assert torch.equal(getattr(solved, stat), getattr(closed, stat)), stat
    assert closed.loss.shape == (3,) and torch.equal(closed.weight.codes, rtn_quantize(W, spec).codes)
    W[1, 2, 3] = float("nan")  # refused as the solve refuses it
    for solve in (lambda: gptq_quantize(W, torch.eye(k).expand(3, k, k), spec), lambda: identity_solve(W, spec)):
        with pytest.raises(ValueError, match="NaN/Inf"):
            solve()


def test_each_matrix_is_solved_or_rounded_and_returned_in_order():
    """gptq_quantize_each: matrices with a Hessian are solved as one batch, the others rounded
    in closed form; each equals its own separate result, in the input's order."""
    E, N, K = 4, 20, 96
    W = torch.stack([_weight(N, K, seed=30 + e) for e in range(E)])
    H = {1: _correlated_hessian(K, 300, seed=40), 2: _correlated_hessian(K, 300, seed=41)}
    spec = QuantSpec(group_size=32, sym=False)
    each = gptq_quantize_each(W, torch.stack([H[1], H[2]]), [1, 2], spec)
    for e in range(E):
        alone = gptq_quantize(W[e], H[e], spec) if e in H else identity_solve(W[e], spec)
        _assert_same_grid(each.weight[e], alone.weight)
        assert each.loss[e] == pytest.approx(float(alone.loss), rel=1e-5) and each.damp[e] == alone.damp
    assert not torch.equal(each.weight.codes[1], rtn_quantize(W[1], spec).codes)  # solved, not rounded
    _assert_same_grid(gptq_quantize_each(W, None, [], spec).weight, rtn_quantize(W, spec))


def test_batched_equals_per_element():
    E, N, K = 3, 20, 96
    W = torch.stack([_weight(N, K, seed=10 + e) for e in range(E)])
    H = torch.stack([_correlated_hessian(K, 300, seed=20 + e) for e in range(E)])
    H[1] = _indefinite(H[1])  # only expert 1 needs more damping
    for spec in (QuantSpec(group_size=32, sym=False), QuantSpec(group_size=64, act_order=True, block_size=40)):
        batched = gptq_quantize(W, H, spec)
        assert batched.loss.shape == (E,) and batched.damp.shape == (E,)
        assert batched.damp.tolist() == pytest.approx([0.01, 0.1, 0.01])
        for e in range(E):
            single = gptq_quantize(W[e], H[e], spec)
            assert torch.equal(batched.weight.codes[e], single.weight.codes)
            assert torch.equal(batched.weight.scales[e], single.weight.scales)
            assert torch.equal(batched.weight.zeros[e], single.weight.zeros)
            assert batched.damp[e] == single.damp
            assert batched.loss[e] == pytest.approx(float(single.loss), rel=1e-5)


def _reference_gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Textbook GPTQ for one matrix, no lazy blocks, fp64: returns the dequantized weight."""
    W, H, k = W.double().clone(), H.double().clone(), W.shape[1]
    width = spec.group_width(k)
    Hd = H + spec.damp * H.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if spec.act_order else torch.arange(k)
    static = [p.double() for p in group_params(W, spec)]  # [N, G], original order
    W, Hd = W[:, perm], Hd[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    Q = torch.zeros_like(W)
    for i in range(k):
        g = int(perm[i]) // width
        if spec.act_order or spec.group_size == -1:
            scale, zero = static[0][:, g], static[1][:, g]
        elif i % width == 0:
            scale, zero = (p.double() for p in quant_params(W[:, i : i + width], spec.bits, spec.sym))
        Q[:, i] = fake_quantize(W[:, i], scale, zero, spec.maxq).double()
        W[:, i:] -= ((W[:, i] - Q[:, i]) / U[i, i]).unsqueeze(1) * U[i, i:].unsqueeze(0)
    return Q[:, torch.argsort(perm)].float()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size,block_size", [(32, 128), (64, 24), (-1, 40)])
def test_lazy_blocked_solver_matches_textbook_gptq(sym, act_order, group_size, block_size):
    W, H = _weight(32, 160, seed=30), _correlated_hessian(160, 400, seed=31)
    spec = QuantSpec(bits=4, group_size=group_size, sym=sym, act_order=act_order, block_size=block_size)
    ours = gptq_quantize(W, H, spec).weight.dequantize()
    reference = _reference_gptq(W, H, spec)
    assert (ours == reference).float().mean() > 0.995  # fp32 vs fp64 rounding may flip a rare tie
    assert float(_loss(W, ours, H)) == pytest.approx(float(_loss(W, reference, H)), rel=0.01)


# ---- GPTQ quality -------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size,K", [(32, 64), (64, 160), (128, 256), (128, 200), (-1, 128)])
def test_gptq_beats_rtn_on_correlated_inputs(sym, act_order, group_size, K):
    W, H = _weight(48, K, seed=3), _correlated_hessian(K, 400, seed=4)
    spec = QuantSpec(bits=4, group_size=group_size, sym=sym, act_order=act_order)
    result = gptq_quantize(W, H, spec)
    gptq_loss = _loss(W, result.weight.dequantize(), H)
    rtn_loss = _loss(W, rtn_quantize(W, spec).dequantize(), H)
    assert gptq_loss < 0.8 * rtn_loss
    # reported stats describe the returned weight, with the undamped H
    assert float(result.loss) == pytest.approx(float(gptq_loss), rel=1e-4)
    assert float(result.rel_loss) == pytest.approx(float(gptq_loss / _loss(W, torch.zeros_like(W), H)), rel=1e-4)


def test_act_order_uses_static_groups_and_round_trips():
    W, H = _weight(32, 96, seed=5), _correlated_hessian(96, 300, seed=6)
    H = H * torch.linspace(0.2, 3.0, 96).sqrt().outer(torch.linspace(0.2, 3.0, 96).sqrt())  # non-trivial order
    spec = QuantSpec(bits=4, group_size=32, sym=False, act_order=True, block_size=20)
    qw = gptq_quantize(W, H, spec).weight
    assert torch.equal(qw.group_index(), torch.arange(96, dtype=torch.int32) // 32)
    scales, zeros = group_params(W, spec)  # static: grid of the original W, original column order
    assert torch.equal(qw.scales, scales.half()) and torch.equal(qw.zeros, zeros.to(torch.uint8))
    requantized = quantize_codes(
        qw.dequantize(), expand_groups(scales, 96, 32), expand_groups(zeros, 96, 32), spec.maxq
    )
    assert torch.equal(requantized.to(torch.uint8), qw.codes)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_all_bit_widths(bits):
    W, H = _weight(16, 64, seed=7), _correlated_hessian(64, 200, seed=8)
    result = gptq_quantize(W, H, QuantSpec(bits=bits, group_size=32))
    assert int(result.weight.codes.max()) <= 2**bits - 1
    assert float(result.rel_loss) < 4.0 ** (-bits) * 2.0  # error shrinks ~2x per bit


def test_8bit_is_near_lossless():
    W, H = _weight(32, 128, seed=9), _correlated_hessian(128, 300, seed=10)
    result = gptq_quantize(W, H, QuantSpec(bits=8, group_size=64, sym=False))
    assert float(result.rel_loss) < 1e-4
    assert (result.weight.dequantize() - W).abs().max() < 0.02 * W.abs().max()


# ---- robustness ---------------------------------------------------------------------------


def _indefinite(H: torch.Tensor) -> torch.Tensor:
    """H shifted so lambda_min = -0.05 * mean(diag): damp 0.01 cannot fix it, damp 0.1 can."""
    shift = (torch.linalg.eigvalsh(H.double())[0] + 0.05 * H.diagonal().double().mean()) / 1.05
    return H - float(shift) * torch.eye(H.shape[-1])


@pytest.mark.parametrize("sym", [True, False])
def test_singular_hessian_with_dead_input(sym):
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(20, 64, generator=gen)  # 20 tokens < 64 inputs: rank-deficient
    X[:, 5] = 0.0  # an input never seen
    H, W = X.T @ X / 20, _weight(16, 64, seed=12)
    spec = QuantSpec(bits=4, group_size=32, sym=sym)
    result = gptq_quantize(W, H, spec)
    deq = result.weight.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(result.loss) and torch.isfinite(result.rel_loss)
    assert result.damp >= spec.damp
    assert (deq[:, 5] == 0).all()  # dead column zeroed, then exactly representable


def test_dead_inputs_leave_the_damping_and_the_live_solve_as_without_them():
    """Dead inputs (never seen: zero rows and columns of H) are independent of the rest, so the
    live columns must solve as the reduced problem does. Their unit diagonal fill used to enter
    mean(diag H), and with it the damping: 137x too much where activations are around 1e-2."""
    gen = torch.Generator().manual_seed(21)
    live = torch.cat([torch.arange(0, 40), torch.arange(56, 128)])
    X = torch.zeros(300, 128)
    X[:, live] = (torch.randn(300, live.numel(), generator=gen) @ torch.randn(live.numel(), live.numel(), generator=gen)
                  * 1e-3)
    H, W = X.T @ X / 300, _weight(24, 128, seed=22)
    spec = QuantSpec(bits=4, group_size=-1, sym=True)
    full = gptq_quantize(W, H, spec).weight.dequantize()
    reduced = gptq_quantize(W[:, live], H[live][:, live], spec).weight.dequantize()
    assert torch.equal(full[:, live], reduced) and (full[:, 40:56] == 0).all()


def test_a_hessian_that_saw_no_input_rounds_to_nearest_instead_of_zeroing_the_weight():
    """H = 0 (no input ever reached the linear) marked every column dead: the whole weight was
    zeroed with a loss of 0. It is now solved against the identity: round to nearest."""
    W, spec = _weight(8, 32, seed=23).expand(2, 8, 32), QuantSpec(group_size=32)
    result = gptq_quantize(W, torch.stack([_correlated_hessian(32, 100, seed=24), torch.zeros(32, 32)]), spec)
    assert torch.equal(result.weight[1].dequantize(), rtn_quantize(W[1], spec).dequantize())
    assert result.weight[1].dequantize().abs().sum() > 0 and float(result.loss[1]) == 0


def test_indefinite_hessian_escalates_damping():
    H = _indefinite(_correlated_hessian(64, 300, seed=13))
    spec = QuantSpec(bits=4, group_size=32)
    result = gptq_quantize(_weight(16, 64, seed=14), H, spec)
    assert result.damp > spec.damp and float(result.damp) == pytest.approx(0.1)
    assert torch.isfinite(result.weight.dequantize()).all()


def test_hopeless_hessian_raises():
    with pytest.raises(ValueError, match="positive-definite"):
        gptq_quantize(_weight(8, 32, seed=15), -torch.eye(32), QuantSpec(group_size=32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rtn_refuses_a_weight_that_is_not_finite(bad: float) -> None:
    """A NaN rounded to code 0 and an inf gave a 65504 scale, silently."""
    W = _weight(8, 64, seed=24)
    W[3, 7] = bad
    with pytest.raises(ValueError, match=r"RTN: weight \[8, 64\] contains NaN/Inf"):
        rtn_quantize(W, QuantSpec(group_size=32))


def test_bad_inputs_raise():
    W = _weight(8, 32, seed=16)
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(W, torch.eye(31), QuantSpec(group_size=32))
    H = torch.eye(32)
    H[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(W, H, QuantSpec(group_size=32))
