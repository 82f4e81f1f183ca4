"""MetricAccumulator against hand-computed values on tiny logits."""

import math

import pytest
import torch

from maverick_quant.errors import InputError
from maverick_quant.validation.metrics import MetricAccumulator, quantiles


def _py_log_softmax(row):
    """log p_v = x_v - log sum_u exp(x_u), in plain Python."""
    log_z = math.log(sum(math.exp(x) for x in row))
    return [x - log_z for x in row]


def _py_expected(ref, cand, targets):
    """Per-token (nll_ref, nll_cand, kl, agree) by the explicit formulas, no torch."""
    out = []
    for r, c, y in zip(ref, cand, targets):
        lr, lc = _py_log_softmax(r), _py_log_softmax(c)
        kl = sum(math.exp(a) * (a - b) for a, b in zip(lr, lc))
        agree = max(range(len(r)), key=r.__getitem__) == max(range(len(c)), key=c.__getitem__)
        out.append((-lr[y], -lc[y], kl, agree))
    return out


def test_single_token_closed_form():
    # p_ref = (1/3, 1/3, 1/3) from equal logits; p_cand = (1/2, 1/4, 1/4) from logits (ln 2, 0, 0).
    acc = MetricAccumulator()
    acc.update(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[math.log(2), 0.0, 0.0]]), torch.tensor([1]))
    s = acc.summary()
    assert s["reference"]["nll"] == pytest.approx(math.log(3))
    assert s["candidate"]["nll"] == pytest.approx(math.log(4))
    assert s["reference"]["ppl"] == pytest.approx(3.0)
    assert s["candidate"]["ppl"] == pytest.approx(4.0)
    assert s["ppl_ratio"] == pytest.approx(4.0 / 3.0)
    # KL = 1/3 [ln(2/3) + ln(4/3) + ln(4/3)] = (5 ln 2) / 3 - ln 3
    assert s["kl"]["mean"] == pytest.approx(5 * math.log(2) / 3 - math.log(3))
    assert s["tokens"] == 1


def test_three_tokens_against_explicit_formulas():
    ref = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -0.5], [-1.0, 1.5, 0.0, 0.3]]
    cand = [[1.0, 1.2, -0.5, 0.0], [0.0, 0.4, 2.5, -0.2], [-0.8, 1.1, 0.2, 0.9]]
    targets = [0, 2, 3]
    acc = MetricAccumulator()
    acc.update(torch.tensor(ref), torch.tensor(cand), torch.tensor(targets))
    s = acc.summary()

    expected = _py_expected(ref, cand, targets)
    nll_ref = sum(e[0] for e in expected) / 3
    nll_cand = sum(e[1] for e in expected) / 3
    kls = sorted(e[2] for e in expected)
    assert s["reference"]["nll"] == pytest.approx(nll_ref, rel=1e-6)
    assert s["candidate"]["nll"] == pytest.approx(nll_cand, rel=1e-6)
    assert s["reference"]["ppl"] == pytest.approx(math.exp(nll_ref), rel=1e-6)
    assert s["candidate"]["ppl"] == pytest.approx(math.exp(nll_cand), rel=1e-6)
    assert s["ppl_ratio"] == pytest.approx(math.exp(nll_cand) / math.exp(nll_ref), rel=1e-6)
    assert s["kl"]["mean"] == pytest.approx(sum(kls) / 3, rel=1e-5)
    assert s["kl"]["median"] == pytest.approx(kls[1], rel=1e-5)
    assert s["kl"]["max"] == pytest.approx(kls[2], rel=1e-5)
    # p90 at position 0.9 * (3 - 1) = 1.8 between the 2nd and 3rd smallest.
    assert s["kl"]["p90"] == pytest.approx(kls[1] + 0.8 * (kls[2] - kls[1]), rel=1e-5)
    assert s["top1_agreement"] == pytest.approx(2 / 3)  # token 0: argmax 0 vs 1 disagree
    assert s["tokens"] == 3
    assert torch.allclose(acc.kl_values(), torch.tensor([e[2] for e in expected]), rtol=1e-5, atol=1e-7)


def test_identical_logits_give_zero_kl_unit_ratio_full_agreement():
    logits = torch.randn(9, 7, generator=torch.Generator().manual_seed(0))
    acc = MetricAccumulator()
    acc.update(logits, logits.clone(), torch.arange(9) % 7)
    s = acc.summary()
    assert s["ppl_ratio"] == pytest.approx(1.0)
    assert s["reference"]["ppl"] == pytest.approx(s["candidate"]["ppl"])
    assert all(s["kl"][name] == pytest.approx(0.0, abs=1e-7) for name in ("mean", "median", "p90", "p99", "max"))
    assert s["top1_agreement"] == 1.0


def _random_case(tokens=37, vocab=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(tokens, vocab, generator=g) * 2
    cand = ref + 0.5 * torch.randn(tokens, vocab, generator=g)
    return ref, cand, torch.randint(0, vocab, (tokens,), generator=g)


def _assert_summaries_close(a, b):
    for section in ("reference", "candidate"):
        for name in ("ppl", "nll"):
            assert a[section][name] == pytest.approx(b[section][name], rel=1e-6)
    for name in ("mean", "median", "p90", "p99", "max"):
        assert a["kl"][name] == pytest.approx(b["kl"][name], rel=1e-5, abs=1e-8)
    assert a["ppl_ratio"] == pytest.approx(b["ppl_ratio"], rel=1e-6)
    assert (a["top1_agreement"], a["tokens"]) == (b["top1_agreement"], b["tokens"])


def test_chunked_and_split_updates_equal_one_update():
    ref, cand, targets = _random_case()
    whole = MetricAccumulator()
    whole.update(ref, cand, targets)
    internal = MetricAccumulator(chunk_elements=4 * 11)  # 4 rows per internal chunk
    internal.update(ref, cand, targets)
    split = MetricAccumulator()
    for start, stop in ((0, 5), (5, 6), (6, 37)):
        split.update(ref[start:stop], cand[start:stop], targets[start:stop])
    for other in (internal, split):
        _assert_summaries_close(other.summary(), whole.summary())
        assert torch.allclose(other.kl_values(), whole.kl_values(), rtol=1e-6, atol=1e-8)


def test_low_precision_logits_are_scored_in_fp32():
    ref, cand, targets = _random_case(tokens=8, vocab=5)
    fp32, bf16 = MetricAccumulator(), MetricAccumulator()
    fp32.update(ref.bfloat16().float(), cand.bfloat16().float(), targets)
    bf16.update(ref.bfloat16(), cand.bfloat16(), targets)
    _assert_summaries_close(bf16.summary(), fp32.summary())
    assert bf16.kl_values().dtype == torch.float32


def test_kl_quantiles_match_torch_quantile():
    ref, cand, targets = _random_case(tokens=101, vocab=13, seed=3)
    acc = MetricAccumulator()
    acc.update(ref, cand, targets)
    kl, values = acc.summary()["kl"], acc.kl_values().double()
    for name, q in (("median", 0.5), ("p90", 0.9), ("p99", 0.99)):
        assert kl[name] == pytest.approx(torch.quantile(values, q).item(), rel=1e-9)
    assert kl["max"] == pytest.approx(values.max().item())


def test_quantiles_by_hand():
    assert quantiles(torch.tensor([4.0, 0.0, 3.0, 1.0, 2.0]), (0.5, 0.9, 1.0, 0.0)) == pytest.approx([2.0, 3.6, 4.0, 0.0])


def test_one_nan_token_fails_every_kl_quantile_gate():
    """A broken candidate (one NaN logit row) must fail kl.median/p90/p99 gates, not only kl.mean:
    torch's sort puts NaN last, which left the quantiles of the finite tokens."""
    from maverick_quant.validation.gates import evaluate_gates, parse_gate

    ref, cand, targets = _random_case(tokens=200, vocab=13, seed=5)
    cand[7] = float("nan")
    acc = MetricAccumulator()
    acc.update(ref, cand, targets)
    kl = acc.summary()["kl"]
    assert all(math.isnan(kl[name]) for name in ("mean", "median", "p90", "p99", "max"))
    results = evaluate_gates([parse_gate(f"kl.{name}<=1.0") for name in ("median", "p90", "p99")], acc.summary())
    assert not any(result.passed for result in results)


def test_a_candidate_emitting_nan_fails_a_top1_gate_and_its_tokens_are_counted():
    """A NaN logit row's argmax counted as one disagreement: with 10 such rows in 200 tokens,
    top1_agreement was 0.95 and a top1_agreement>=0.9 gate passed a broken candidate."""
    from maverick_quant.validation.gates import evaluate_gates, parse_gate

    ref, cand, targets = _random_case(tokens=200, vocab=13, seed=6)
    cand[:10] = ref[:10]
    cand[10:20] = float("nan")
    acc = MetricAccumulator()
    acc.update(ref, cand, targets)
    summary = acc.summary()
    assert summary["nonfinite_tokens"] == 10 and math.isnan(summary["top1_agreement"])
    assert not evaluate_gates([parse_gate("top1_agreement>=0.5")], summary)[0].passed
    clean = MetricAccumulator()
    clean.update(ref, ref.clone(), targets)
    assert clean.summary()["nonfinite_tokens"] == 0 and clean.summary()["top1_agreement"] == 1.0


def test_a_reference_emitting_nan_or_inf_gives_nan_kl_not_zero():
    """NaN (or +Inf) reference logits made log p_ref NaN, which the p_ref = 0 mask counted as a
    0 term: a broken reference scored KL 0 and passed every KL gate."""
    ref, cand, targets = _random_case(tokens=50, vocab=13, seed=8)
    ref[4] = float("nan")
    ref[9, 2] = float("inf")
    cand[20, 5] = float("inf")
    acc = MetricAccumulator()
    acc.update(ref, cand, targets)
    kl = acc.kl_values()
    assert [t for t in range(50) if math.isnan(kl[t])] == [4, 9, 20]
    assert acc.summary()["nonfinite_tokens"] == 3 and math.isnan(acc.summary()["kl"]["mean"])
    ref[9, 2] = ref[4] = cand[20, 5] = 0.0
    clean = MetricAccumulator()
    clean.update(ref, cand, targets)
    assert clean.summary()["nonfinite_tokens"] == 0


def test_quantiles_between_two_infinities_are_infinite():
    """inf + (h - floor h) * (inf - inf) was NaN."""
    inf = math.inf
    assert quantiles(torch.tensor([0.1, 0.2, inf, inf]), (0.9, 0.5)) == [inf, pytest.approx(0.2 + 0.5 * inf)]


def test_the_median_expert_error_is_nan_when_an_expert_is():
    from maverick_quant.validation.experts import ExpertError, summarize_experts

    errors = [ExpertError(1, e, 10, error, 1.0) for e, error in enumerate([0.1, 0.3, 0.2, 0.4])]
    assert summarize_experts(errors)["rel_error"]["median"] == pytest.approx(0.25)
    errors[1] = ExpertError(1, 1, 10, math.nan, 1.0)
    assert math.isnan(summarize_experts(errors)["rel_error"]["median"])


def test_shape_mismatch_and_empty_summary():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="logits must both be"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match="no tokens were scored"):
        acc.summary()
    assert acc.kl_values().numel() == 0
