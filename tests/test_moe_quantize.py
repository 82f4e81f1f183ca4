"""Per-expert GPTQ on a tiny Llama 4 with uneven routing: audit, policies, chunking, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maverick_quant.arch.base import unfuse_experts
from maverick_quant.bundle import Bundle
from maverick_quant.checkpoint import Checkpoint
from maverick_quant.calibration.moe import all_token_sample_size, route, sample_tokens
from maverick_quant.cli import cli
from maverick_quant.compress.grid import rtn_quantize
from maverick_quant.expert_solve import quantize_expert_chunk
from maverick_quant.exporters.registry import open_export
from maverick_quant.recipe import ExpertPolicy, MoESpec, QuantizeSpec
from maverick_quant.streaming import StreamingModel, open_source
from tests.conftest import SHARED_DATA

WINDOWS, LENGTH = 16, 40
MOE_LAYERS, EXPERTS = (1, 3), 8


def run(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def moe_bundle(tiny_llama4_dir: Path, tmp_path_factory) -> Path:
    """GPTQ with experts in chunks of 7 (1 MiB budget) and min_tokens 8 (expert 0 falls back)."""
    out = tmp_path_factory.mktemp("moe") / "bundle"
    output = run("quantize", tiny_llama4_dir, "--data", _text(tmp_path_factory.mktemp("text"), "wiki.valid.tokens"),
        "--samples", WINDOWS, "--seq-len", LENGTH, "--group-size", 32, "--moe-min-tokens", 8, "--moe-chunk-mib", 1,
        "--out", out, "--no-progress")
    assert "experts were solved on Hessians from fewer rows than a projection's input width K" in output
    return out


def _text(folder: Path, name: str) -> Path:
    """Some of a WikiText-2 split when ../shared is there, else a made-up paragraph."""
    source = SHARED_DATA / "wikitext-2" / name
    text = source.read_text(encoding="utf-8")[:60_000] if source.is_file() else (
        "A quiet morning in the harbour town, boats leaving one by one for the open sea. " * 200)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_every_expert_is_quantized_and_audited(moe_bundle: Path) -> None:
    audit = json.loads((moe_bundle / "audit.json").read_text())["experts"]
    assert sorted((r["layer"], r["expert"]) for r in audit) == [(l, e) for l in MOE_LAYERS for e in range(EXPERTS)]
    for layer in MOE_LAYERS:
        records = [r for r in audit if r["layer"] == layer]
        assert sum(r["tokens"] for r in records) == WINDOWS * LENGTH
        assert abs(sum(r["share"] for r in records) - 1) < 1e-9
    for record in audit:
        starved = record["tokens"] < 8
        assert record["policy"] == ("mixed" if starved else "routed")
        assert ("fallback" in record["reason"]) == starved
        assert set(record["linears"]) == {"gate_proj", "up_proj", "down_proj"}
        assert all(0 <= l["rel_loss"] < 1 and l["damp"] > 0 for l in record["linears"].values())
        widths = {"gate_proj": 64, "up_proj": 64, "down_proj": 32}  # input widths: hidden 64, expert intermediate 32
        rows = WINDOWS * LENGTH if record["policy"] == "mixed" else record["tokens"]  # mixed: every token (640 < 4096)
        assert record["rank_deficient"] == [name for name, k in widths.items() if rows < k]
    assert any(r["tokens"] < 8 for r in audit)  # the fixture starves expert 0
    assert any(r["rank_deficient"] for r in audit)  # and routes fewer tokens than inputs to some others


def test_bundle_holds_all_experts_in_chunks_and_the_float_router(moe_bundle: Path, tiny_llama4_dir: Path) -> None:
    bundle = Bundle(moe_bundle)
    chunks = list(bundle.expert_chunks(1))
    assert [first for first, _ in chunks] == [0, 7]
    assert sum(c["gate_proj"].shape[0] for _, c in chunks) == EXPERTS
    tensors = bundle.layer_tensors(1)
    assert tensors["feed_forward.experts.gate_up_proj"].shape == (EXPERTS, 64, 64)
    moe = bundle.table.plan(bundle.text_config, 1).moe
    stored = {name: torch.cat([c[name].dequantize() for _, c in chunks]) for name in chunks[0][1]}
    for first, count in ((0, EXPERTS), (5, 3)):  # the whole layer, and a range across the chunk boundary (7)
        fused = bundle.expert_tensors(1, first, count)  # filled expert by expert into the fused tensors
        assert {name: tuple(t.shape) for name, t in fused.items()} == {
            "feed_forward.experts.gate_up_proj": (count, 64, 64), "feed_forward.experts.down_proj": (count, 32, 64)}
        for name, weight in unfuse_experts(moe, fused).items():
            assert torch.equal(weight, stored[name][first : first + count]), name
    original = open_source(tiny_llama4_dir).layer_tensors(1)
    assert torch.equal(tensors["feed_forward.router.weight"], original["feed_forward.router.weight"])
    error = (tensors["feed_forward.experts.down_proj"] - original["feed_forward.experts.down_proj"]).norm()
    assert 0 < error < 0.2 * original["feed_forward.experts.down_proj"].norm()


def test_validate_and_gptq_export_of_an_moe_bundle(moe_bundle: Path, tiny_llama4_dir: Path, tmp_path: Path) -> None:
    """GPTQ drifts less than RTN from the float model (KL; top-1 is noisy on a random model's
    flat distributions), the report joins each expert's quantize audit with its validation
    error, then the GPTQ export reads back to the bundle's exact values."""
    text = _text(tmp_path, "wiki.test.raw")
    run("quantize", tiny_llama4_dir, "--method", "rtn", "--group-size", 32, "--out", tmp_path / "rtn", "--no-progress")
    kl = {}
    for name, candidate in (("gptq", moe_bundle), ("rtn", tmp_path / "rtn")):
        run("validate", "--reference", tiny_llama4_dir, "--candidate", candidate, "--data", text, "--ctx", LENGTH,
            "--max-windows", 6, "--report", tmp_path / f"report-{name}", "--gate", "ppl_ratio<=1.5",
            "--gate", "experts.rel_error.max<=0.5", "--gate", "routing.agreement.min>=0.5")
        report = json.loads((tmp_path / f"report-{name}" / "report.json").read_text())
        kl[name] = report["kl"]["mean"]
    assert report["experts"]["count"] == 16 and not (tmp_path / "report-rtn" / "expert_tokens.png").exists()
    assert (tmp_path / "report-gptq" / "expert_tokens.png").is_file()  # RTN saw no tokens: nothing to draw
    markdown = (tmp_path / "report-gptq" / "report.md").read_text()
    assert "![expert_tokens](expert_tokens.png)" in markdown and "## Routed experts" in markdown
    assert "![expert_error](expert_error.png)" in markdown and "Largest validation error:" in markdown
    assert "16 experts, " in markdown and "| layer | expert | calib. tokens | policy | quantize rel. loss |" in markdown
    assert "Routing agreement, each model on its own stream: mean" in markdown
    assert "Fewest calibration tokens" not in (tmp_path / "report-rtn" / "report.md").read_text()  # RTN routes none
    gptq = json.loads((tmp_path / "report-gptq" / "report.json").read_text())
    assert gptq["experts"]["fallbacks"] >= 1 and all(g["passed"] for g in gptq["gates"])
    rows = gptq["experts"]["per_expert"]  # the quantize audit and the validation joined per expert
    assert all(r["policy"] in ("routed", "mixed") and "rel_error" in r for r in rows)
    assert sum(r["eval_tokens"] for r in rows) == 2 * 6 * LENGTH  # two MoE layers, every token routed once
    assert [layer.get("routing_agreement") is not None for layer in gptq["layers"]] == [False, True, False, True]
    assert 0 < kl["gptq"] < kl["rtn"]
    run("export", moe_bundle, "--format", "gptq", "--out", tmp_path / "gptq")
    index = Checkpoint(tmp_path / "gptq").tensors
    expert = "language_model.model.layers.3.feed_forward.experts.5.down_proj"
    assert {f"{expert}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")} <= set(index)
    assert not any("gate_up_proj" in name for name in index)
    assert "language_model.model.layers.3.feed_forward.router.weight" in index
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert {"feed_forward.router", "vision_model", "multi_modal_projector", "lm_head"} <= set(config["modules_to_not_convert"])
    assert any(name.startswith("vision_model.") for name in index)  # the vision tower passes through
    exported, bundled = open_export(tmp_path / "gptq").layer_tensors(3), Bundle(moe_bundle).layer_tensors(3)
    assert all(torch.equal(exported[name], bundled[name]) for name in bundled)


@pytest.mark.parametrize("fmt", ["gptq"])  # compressed-tensors: tests/test_compressed_tensors.py (groups tiling K)
def test_rope_layers_attention_is_written_float_for_vllm(moe_bundle: Path, tmp_path: Path, fmt: str) -> None:
    """vLLM runs Llama 4 with neox rope and moves q/k rows from Hugging Face's interleaved
    rotary pairs to its halves at load time, only for tensors named `.weight`
    (llama4.py, permute_qk_weight_for_rotary): packed q/k would rotate the wrong pairs in
    every rope layer. So a rope layer's q/k/v (one fused module in vLLM) are written as float
    weights holding the bundle's values; a NoPE layer's stay packed."""
    output = run("export", moe_bundle, "--format", fmt, "--out", tmp_path / fmt)
    assert "written as float" in output
    bundle, stored = Bundle(moe_bundle), Checkpoint(tmp_path / fmt).tensors
    rope = bundle.text_config.no_rope_layers
    assert 0 in rope and 1 in rope, rope  # both kinds of layer are checked
    exported = open_export(tmp_path / fmt)
    for index, uses_rope in enumerate(rope):
        prefix = bundle.table.prefix(index)
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert (f"{prefix}{proj}.weight" in stored) == bool(uses_rope), (index, proj)
        ours, theirs = bundle.layer_tensors(index, experts=False), exported.layer_tensors(index, experts=False)
        assert torch.equal(theirs["self_attn.q_proj.weight"], ours["self_attn.q_proj.weight"])


def test_awq_export_of_an_moe_bundle_holds_every_expert_and_reads_back_exactly(smollm2_dir: Path, tmp_path: Path) -> None:
    """The AWQ GEMM layout per expert; the router stays float. (A dense MLP of width 64: the
    tiny model's 48 is no multiple of a group, which the AWQ export refuses by name.)"""
    from tests.conftest import make_tiny_llama4

    model_dir = make_tiny_llama4(smollm2_dir, tmp_path / "model", intermediate_size_mlp=64, num_hidden_layers=4)
    bundle = tmp_path / "bundle"
    run("quantize", model_dir, "--method", "rtn", "--group-size", 32, "--asym", "--out", bundle, "--no-progress")
    run("export", bundle, "--format", "awq", "--out", tmp_path / "awq")
    index = Checkpoint(tmp_path / "awq").tensors
    expert = "language_model.model.layers.3.feed_forward.experts.7.gate_proj"
    assert {f"{expert}.{p}" for p in ("qweight", "qzeros", "scales")} <= set(index)
    assert "language_model.model.layers.3.feed_forward.router.weight" in index
    assert json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    exported, bundled = open_export(tmp_path / "awq").layer_tensors(3), Bundle(bundle).layer_tensors(3)
    assert set(exported) == set(bundled) and all(torch.equal(exported[name], bundled[name]) for name in bundled)


def _chunk_inputs(tiny_llama4_dir: Path, tokens: int = 200):
    source = open_source(tiny_llama4_dir)
    model = StreamingModel(source)
    moe = model.plan(1).moe
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(2))
    routing = route(x, source.layer_tensors(1)["feed_forward.router.weight"], moe.top_k)
    weights = unfuse_experts(moe, source.expert_tensors(1, 0, EXPERTS))
    return x, routing, moe, weights


def test_rtn_policy_is_round_to_nearest_and_zero_token_experts_still_get_weights(tiny_llama4_dir: Path) -> None:
    x, routing, moe, weights = _chunk_inputs(tiny_llama4_dir, tokens=5)  # 5 tokens: most experts get none
    spec = QuantizeSpec(moe=MoESpec(policy=ExpertPolicy.RTN))
    quantized, records = quantize_expert_chunk(x, routing, moe, weights, 0, spec)
    for name in ("gate_proj", "down_proj"):
        assert torch.equal(quantized[name].codes, rtn_quantize(weights[name], spec.weights).codes)
    routed = QuantizeSpec(moe=MoESpec(min_tokens=1))
    quantized, records = quantize_expert_chunk(x, routing, moe, weights, 0, routed)
    empty = [r for r in records if r["tokens"] == 0]
    assert empty and all(r["policy"] == "mixed" and "fallback" in r["reason"] for r in empty)
    for record in empty:  # a real quantized weight, not zeros and not the float weight
        w = quantized["up_proj"][record["expert"]].dequantize()
        assert torch.isfinite(w).all() and w.abs().sum() > 0


def test_rtn_fallback_experts_are_rounded_beside_the_solved_ones_of_their_chunk(tiny_llama4_dir: Path) -> None:
    """A chunk mixing both: the experts that fall back to `rtn` are round to nearest (closed
    form, audited with H = I's loss ||W - Q||^2), the others are their routed solve bit for bit."""
    x, routing, moe, weights = _chunk_inputs(tiny_llama4_dir, tokens=600)
    spec = QuantizeSpec(moe=MoESpec(min_tokens=80, fallback=ExpertPolicy.RTN))
    routed, _ = quantize_expert_chunk(x, routing, moe, weights, 0, QuantizeSpec(moe=MoESpec(min_tokens=1)))
    quantized, records = quantize_expert_chunk(x, routing, moe, weights, 0, spec)
    rounded = {r["expert"] for r in records if r["policy"] == "rtn"}
    assert rounded and len(rounded) < EXPERTS  # both kinds are present
    for name in ("gate_proj", "up_proj", "down_proj"):
        expected_rtn = rtn_quantize(weights[name], spec.weights)
        for e in range(EXPERTS):
            expected = expected_rtn[e] if e in rounded else routed[name][e]
            assert torch.equal(quantized[name][e].codes, expected.codes), (name, e)
        for e in rounded:
            error = (weights[name][e] - expected_rtn[e].dequantize()).square().sum()
            assert records[e]["linears"][name]["loss"] == pytest.approx(float(error), rel=1e-6)


def test_policies_change_only_what_they_should(tiny_llama4_dir: Path) -> None:
    x, routing, moe, weights = _chunk_inputs(tiny_llama4_dir)
    routed, _ = quantize_expert_chunk(x, routing, moe, weights, 0, QuantizeSpec(moe=MoESpec(min_tokens=1)))
    mixed, records = quantize_expert_chunk(x, routing, moe, weights, 0,
                                           QuantizeSpec(moe=MoESpec(policy=ExpertPolicy.MIXED, mix=1.0, min_tokens=1)))
    assert {r["policy"] for r in records} == {"mixed"}
    assert not torch.equal(routed["gate_proj"].codes, mixed["gate_proj"].codes)
    halves = [quantize_expert_chunk(x, routing, moe, {k: v[s] for k, v in weights.items()}, s.start,
                                    QuantizeSpec(moe=MoESpec(min_tokens=1)))[0] for s in (slice(0, 3), slice(3, 8))]
    for name in ("gate_proj", "up_proj", "down_proj"):  # chunking does not change any expert's result
        assert torch.equal(torch.cat([h[name].codes for h in halves]), routed[name].codes)


def test_require_full_rank_sends_experts_with_fewer_tokens_than_inputs_to_the_fallback(tiny_llama4_dir: Path) -> None:
    """`require_full_rank`: an expert routed fewer tokens than its widest input (hidden 64) is
    solved as `mixed` (the fallback), exactly as under `--moe-policy mixed`; the others keep
    their routed solve, bit for bit; no routed Hessian is left rank-deficient."""
    x, routing, moe, weights = _chunk_inputs(tiny_llama4_dir, tokens=600)
    routed, _ = quantize_expert_chunk(x, routing, moe, weights, 0, QuantizeSpec(moe=MoESpec(min_tokens=1)))
    mixed, _ = quantize_expert_chunk(x, routing, moe, weights, 0,
                                     QuantizeSpec(moe=MoESpec(policy=ExpertPolicy.MIXED, min_tokens=1)))
    full, records = quantize_expert_chunk(x, routing, moe, weights, 0,
                                          QuantizeSpec(moe=MoESpec(min_tokens=1, require_full_rank=True)))
    short = [r["expert"] for r in records if r["tokens"] < 64]
    assert short and len(short) < EXPERTS  # both kinds are present
    for record in records:
        e = record["expert"]
        expected = mixed if e in short else routed
        assert record["policy"] == ("mixed" if e in short else "routed")
        assert ("input width 64 (require_full_rank)" in record["reason"]) == (e in short)
        assert record["rank_deficient"] == []
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(full[name].codes[e], expected[name].codes[e])


def test_the_all_token_sample_holds_at_least_twice_the_widest_input_by_default() -> None:
    """H_all,e of `mixed` is a mean over T_s sampled rows, so rank <= T_s: by default T_s is
    max(4096, 2 K) (Maverick's down_proj, K = 8192: 16,384 rows, where 4096 left rank 4096)."""
    assert all_token_sample_size(MoESpec(), 8192) == 16_384
    assert all_token_sample_size(MoESpec(), 64) == 4096
    assert all_token_sample_size(MoESpec(all_tokens=100), 8192) == 100  # given: kept


def test_mixed_experts_are_audited_rank_deficient_when_their_distinct_tokens_are_fewer_than_k(
        tiny_llama4_dir: Path) -> None:
    """A `mixed` expert's Hessian reads its routed tokens and the all-token sample, which
    overlap: with a sample of 16 rows, an expert is rank-deficient on the linears (gate/up K =
    64, down K = 32) whose K exceeds the distinct tokens of both; with the default sample (here
    every one of 600 tokens) on none. With 40 calibration tokens in all, no sample helps: gate/up
    stay rank-deficient, though routed + sampled rows (up to 40 + 40) can reach 64."""
    widths = {"gate_proj": 64, "up_proj": 64, "down_proj": 32}
    x, routing, moe, weights = _chunk_inputs(tiny_llama4_dir, tokens=600)
    _, small = quantize_expert_chunk(x, routing, moe, weights, 0,
                                     QuantizeSpec(moe=MoESpec(policy=ExpertPolicy.MIXED, min_tokens=1, all_tokens=16)))
    sample = set(sample_tokens(600, 16).tolist())
    overlapping = 0
    for record in small:
        routed = set(routing.tokens_of(record["expert"])[0].tolist())
        overlapping += bool(routed & sample)
        assert record["policy"] == "mixed"
        assert record["rank_deficient"] == [name for name, k in widths.items() if len(routed | sample) < k]
    assert overlapping and any(r["rank_deficient"] for r in small)
    _, default = quantize_expert_chunk(x, routing, moe, weights, 0,
                                       QuantizeSpec(moe=MoESpec(policy=ExpertPolicy.MIXED, min_tokens=1)))
    assert [r["rank_deficient"] for r in default] == [[]] * EXPERTS
    x, routing, moe, weights = _chunk_inputs(tiny_llama4_dir, tokens=40)
    _, few = quantize_expert_chunk(x, routing, moe, weights, 0,
                                   QuantizeSpec(moe=MoESpec(policy=ExpertPolicy.MIXED, min_tokens=1)))
    assert [r["rank_deficient"] for r in few] == [["gate_proj", "up_proj"]] * EXPERTS


def test_inspect_summarizes_experts_and_draws_the_heat_map(moe_bundle: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(moe_bundle), "--plot", str(tmp_path / "experts.png")])
    assert result.exit_code == 0, result.output
    assert "most used:" in result.output and "fallbacks: " in result.output and "L1/E0" in result.output
    audit = json.loads((moe_bundle / "audit.json").read_text())["experts"]
    deficient = sum(bool(r["rank_deficient"]) for r in audit)
    assert f"rank-deficient Hessians: {deficient} experts" in result.output
    assert (tmp_path / "experts.png").read_bytes()[:4] == b"\x89PNG"
    assert "files verified against the manifest" in result.output
    again = CliRunner().invoke(cli, ["inspect", str(moe_bundle), "--plot", str(tmp_path / "experts.png")])
    assert again.exit_code == 2 and "--force" in again.output
    assert CliRunner().invoke(cli, ["inspect", str(moe_bundle), "--plot", str(tmp_path / "experts.png"),
                                    "--force"]).exit_code == 0


def test_inspect_finds_a_bundle_file_whose_bytes_changed_and_nothing_opens_an_incomplete_bundle(
        moe_bundle: Path, tmp_path: Path) -> None:
    """inspect hashes every file against the manifest (exit 1, naming it); a file missing or of
    another size is refused when the bundle is opened, by any command, naming the file."""
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(moe_bundle, copy)
    layer = sorted((copy / "layers").glob("*.safetensors"))[0]
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    layer.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["inspect", str(copy)])
    assert result.exit_code == 1 and f"hash or size mismatch: layers/{layer.name}" in result.output, result.output
    quick = CliRunner().invoke(cli, ["inspect", str(copy), "--no-verify"])
    assert quick.exit_code == 0 and "mismatch" not in quick.output and "verified" not in quick.output
    layer.unlink()
    for command in (["inspect", str(copy)], ["export", str(copy), "--format", "gptq", "--out", str(tmp_path / "gptq")]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2 and f"layers/{layer.name} (missing)" in result.output, result.output
    assert not (tmp_path / "gptq").exists()


def test_coverage_counts_every_calibration_token_per_moe_layer(tiny_llama4_dir: Path, tiny_llama_dir: Path,
                                                                tmp_path: Path) -> None:
    text = _text(tmp_path, "wiki.valid.tokens")
    run("calibrate", tiny_llama4_dir, "--data", text, "--samples", 4, "--seq-len", 40, "--coverage",
        "--out", tmp_path / "calib", "--no-progress")
    coverage = json.loads((tmp_path / "calib" / "coverage.json").read_text())
    assert sorted(coverage["layers"]) == ["1", "3"]
    assert all(sum(counts) == 160 and len(counts) == EXPERTS for counts in coverage["layers"].values())
    assert (tmp_path / "calib" / "coverage.png").is_file()
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_llama_dir), "--data", str(text), "--samples", "2",
                                      "--seq-len", "16", "--coverage", "--out", str(tmp_path / "dense")])
    assert result.exit_code == 2 and "no mixture-of-experts layers" in result.output
    assert not (tmp_path / "dense").exists()


def test_quantized_router_is_solved_exported_and_read_back(tiny_llama4_dir: Path, tmp_path: Path) -> None:
    run("quantize", tiny_llama4_dir, "--data", _text(tmp_path, "wiki.valid.tokens"), "--samples", 4, "--seq-len", LENGTH,
        "--group-size", 32, "--moe-quantize-router", "--out", tmp_path / "bundle", "--no-progress")
    bundle = Bundle(tmp_path / "bundle")
    quantized, passthrough = bundle.quantized_layer(1)
    assert "feed_forward.router" in quantized and "feed_forward.router.weight" not in passthrough
    run("export", tmp_path / "bundle", "--format", "gptq", "--out", tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    router = bundle.table.prefix(1) + "feed_forward.router"
    from transformers.quantizers.quantizers_utils import should_convert_module

    # vLLM's Llama 4 router is never quantized: float weights, kept so by the name as loaders match it
    assert not should_convert_module(router, config["modules_to_not_convert"])
    assert not should_convert_module(router.removeprefix("language_model."), config["modules_to_not_convert"])
    stored = Checkpoint(tmp_path / "gptq").tensors
    assert f"{router}.weight" in stored and f"{router}.qweight" not in stored
    exported = open_export(tmp_path / "gptq").layer_tensors(1)
    assert torch.equal(exported["feed_forward.router.weight"], bundle.layer_tensors(1)["feed_forward.router.weight"])


def test_validation_streams_experts_and_equals_the_whole_model(moe_bundle: Path, tiny_llama4_dir: Path,
                                                               tmp_path: Path) -> None:
    """Streamed validation with experts read a few at a time (chunks of 7 and 1) gives the
    perplexities transformers computes with the whole float model and the whole dequantized bundle."""
    from tests.conftest import bundle_logits, model_logits

    from maverick_quant.validation.evaluate import evaluate

    windows = torch.randint(0, 49152, (2, LENGTH), generator=torch.Generator().manual_seed(6))
    result = evaluate(open_source(tiny_llama4_dir), Bundle(moe_bundle), windows, show_progress=False, expert_chunk_mib=1)

    def ppl(logits: torch.Tensor) -> float:
        nll = -logits[:, :-1].double().log_softmax(-1).gather(-1, windows[:, 1:, None]).mean()
        return float(nll.exp())

    reference = ppl(model_logits(tiny_llama4_dir, windows))
    candidate = ppl(bundle_logits(tiny_llama4_dir, Bundle(moe_bundle), windows, tmp_path / "float"))
    assert result.summary["reference"]["ppl"] == pytest.approx(reference, rel=1e-4)
    assert result.summary["candidate"]["ppl"] == pytest.approx(candidate, rel=1e-4)
    assert all(err > 0 for _, err in result.layer_errors)


@pytest.mark.parametrize("grid,refused,expected", [
    (["--asym", "--group-size", 32], {"gptq": "--sym", "compressed-tensors": "Only symmetric quantization"}, ("awq",)),
    (["--sym", "--bits", 2, "--group-size", 32], {"gptq": "bits in (4, 8)", "compressed-tensors": "bits in (4, 8)"}, ()),
    (["--sym", "--group-size", -1], {"gptq": "not per channel", "compressed-tensors": "not per channel"}, ()),
])
def test_exports_refuse_moe_grids_that_vllms_expert_kernels_cannot_run(tokenizer_dir: Path, tmp_path: Path, grid: list,
                                                                       refused: dict, expected: tuple) -> None:
    """Llama 4's experts run in vLLM on MoeWNA16 or compressed-tensors' WNA16 MoE (never fused
    Marlin: the router score scales the input): 4/8 bits in groups, and symmetric for
    compressed-tensors. Other grids are refused before anything is written; AWQ stores zero points."""
    from tests.conftest import make_tiny_llama4

    model = make_tiny_llama4(tokenizer_dir, tmp_path / "model", intermediate_size_mlp=64)  # AWQ: groups of 32 tile K
    run("quantize", model, "--method", "rtn", *grid, "--out", tmp_path / "rtn", "--no-progress")
    for fmt, message in refused.items():
        result = CliRunner().invoke(cli, ["export", str(tmp_path / "rtn"), "--format", fmt, "--out", str(tmp_path / fmt)])
        assert result.exit_code == 2 and message in result.output and "MoE bundle" in result.output, result.output
        assert not (tmp_path / fmt).exists()
    for fmt in expected:
        run("export", tmp_path / "rtn", "--format", fmt, "--out", tmp_path / fmt)
        assert (tmp_path / fmt / "config.json").is_file()


def test_quantize_shows_each_moe_layers_experts_under_the_bar_of_layers(tiny_llama4_dir: Path, tmp_path: Path) -> None:
    """A Maverick MoE layer takes long: its experts get their own bar (counts and a rate)."""
    output = run("quantize", tiny_llama4_dir, "--method", "rtn", "--group-size", 32, "--out", tmp_path / "bundle")
    assert "rtn layers" in output and "layer 1 experts" in output and "layer 3 experts" in output
    assert "/8 " in output.split("layer 1 experts", 1)[1].split("\r", 1)[0]  # 8 experts counted


def test_a_gptq_run_on_fewer_tokens_than_a_linears_width_is_told_which_but_not_for_routed_experts(
        tiny_llama4_dir: Path) -> None:
    """Dense and shared-expert linears of the tiny Llama 4 read K = 64 (hidden, attention
    output), 48 (the dense MLP's down) or 32 (the shared expert's down); routed experts (K = 64
    and 32) are audited per expert instead, so never named here."""
    from maverick_quant.pipeline import rank_deficient_note
    from maverick_quant.recipe import Method

    source = open_source(tiny_llama4_dir)
    table, text = source.table, source.text_config
    note = rank_deficient_note(table, text, QuantizeSpec(), 40)
    assert note is not None and "holds 40 tokens" in note and "at least 64 tokens" in note, note
    assert "layers.0.self_attn.q_proj (K=64)" in note and ".experts." not in note, note
    # dense layers 0 and 2: q k v o gate up (64) and down (48); MoE layers 1 and 3: q k v o and
    # the shared expert's gate up (64); not the shared down (32 < 40) nor the routed experts
    assert "input width of 26 linears" in note, note
    assert "input width of 24 linears" in rank_deficient_note(table, text, QuantizeSpec(), 48)  # K = 48 is met by 48
    assert rank_deficient_note(table, text, QuantizeSpec(), 64) is None  # every width met
    assert rank_deficient_note(table, text, QuantizeSpec(method=Method.AWQ), 8) is None  # no GPTQ solve
    assert rank_deficient_note(table, text, QuantizeSpec(method=Method.AWQ_GPTQ), 8) is not None
