"""`maverick-quant plan`: predictions from config.json and headers, checked against a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from maverick_quant.cli import cli
from maverick_quant.compute_rates import COST_MODEL

REPO = Path(__file__).resolve().parents[1]
RUN_OPTIONS = ["--method", "gptq", "--samples", "8", "--seq-len", "64", "--group-size", "32", "--moe-chunk-mib", "2",
               "--device", "cpu"]  # host memory is what is compared


def test_maverick_plan_fits_one_host_with_64_gib(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["plan", "maverick", "--samples", "128", "--seq-len", "2048",
                                      "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["model"] == "maverick" and result.output.startswith("# Plan for maverick\n"), result.output[:80]
    # 24 MoE layers x 128 experts x 3 + 48 x 4 attention + 24 dense MLPs x 3 + 24 shared experts x 3
    assert plan["quantized_tensors"] == 24 * 128 * 3 + 48 * 4 + 24 * 3 + 24 * 3
    assert 3.8e11 < plan["quantized_params"] < 4.0e11
    assert plan["peak_host_bytes"] < 64 * 2**30
    assert 180 * 2**30 < plan["outputs"]["gptq"] < 215 * 2**30  # ~4.1 bits per weight + bf16 pass-through
    assert "peak host memory" in result.output and "| gguf Q4_K |" in result.output


def test_available_memory_is_the_smaller_of_meminfo_and_the_cgroup_limit(tmp_path: Path) -> None:
    """A container's limit is not in MemAvailable, which counts the whole host: the self-data
    check and plan's warning read both."""
    from maverick_quant.host_memory import available_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       33554432 kB\nMemAvailable:    8388608 kB\n")
    limit, usage, stat = tmp_path / "memory.max", tmp_path / "memory.current", tmp_path / "memory.stat"
    limit.write_text(f"{4 * 2**30}\n")
    usage.write_text(f"{3 * 2**30}\n")  # 2 GiB of it page cache the kernel reclaims first (streamed shards)
    stat.write_text(f"anon {2**30}\nfile {2 * 2**30}\ninactive_file {2 * 2**30}\n")
    cgroup = [(limit, usage, stat, "inactive_file")]
    assert available_bytes(meminfo, cgroup) == 3 * 2**30
    limit.write_text("max\n")
    assert available_bytes(meminfo, cgroup) == 8 * 2**30
    assert available_bytes(tmp_path / "none", [(tmp_path / "no", tmp_path / "ne", tmp_path / "ns", "x")]) is None


def test_plan_warns_when_this_machine_has_less_memory_than_the_peak(tmp_path: Path, monkeypatch) -> None:
    """plan printed what a run needs and exited 0 on a machine without it, with no word."""
    from maverick_quant.plan_render import _fit_here_line

    result = CliRunner().invoke(cli, ["plan", "maverick", "--samples", "128", "--seq-len", "2048", "--device", "cpu",
                                      "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output

    class Peak:
        peak_host_bytes = json.loads((tmp_path / "plan.json").read_text())["peak_host_bytes"]

    assert _fit_here_line(Peak(), available=2**30)[0].startswith("- warning: this machine has 1.0 GiB of host memory")
    assert _fit_here_line(Peak(), available=Peak.peak_host_bytes) == []
    import maverick_quant.host_memory as host_memory

    for available, warned in ((2**30, True), (2**50, False)):  # the printed plan says it
        monkeypatch.setattr(host_memory, "available_bytes", lambda: available)
        result = CliRunner().invoke(cli, ["plan", "maverick", "--samples", "128", "--seq-len", "2048", "--device", "cpu"])
        assert result.exit_code == 0 and ("- warning: this machine has" in result.output) is warned, result.output


def test_plan_of_a_missing_model_names_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere" in result.output


def test_plan_refuses_a_checkpoint_its_config_does_not_describe(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The plan reads the shard headers: a config.json that disagrees with them (more layers, a
    wider hidden size) is refused as quantize refuses it, not planned (or a KeyError)."""
    import shutil

    for key, value, message in (("num_hidden_layers", 5, "missing tensor 'model.layers.3."),
                                ("hidden_size", 128, "config.json implies")):
        model = tmp_path / key
        shutil.copytree(tiny_llama_dir, model)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, key: value}))
        result = CliRunner().invoke(cli, ["plan", str(model)])
        assert result.exit_code == 2 and message in result.output, result.output


def test_plan_json_never_replaces_a_file_without_force(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text("mine")
    command = ["plan", "maverick", "--samples", "8", "--seq-len", "64", "--json", str(tmp_path / "plan.json")]
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 2 and "--force" in result.output and (tmp_path / "plan.json").read_text() == "mine"
    assert CliRunner().invoke(cli, [*command, "--force"]).exit_code == 0
    assert json.loads((tmp_path / "plan.json").read_text())["quantized_tensors"] > 0


@pytest.mark.slow
def test_plan_memory_is_within_25_percent_of_the_measured_peak(tiny_llama4_dir: Path, small_text_file: Path,
                                                               tmp_path: Path) -> None:
    """The predicted peak host memory against the peak RSS of a real quantize process with
    the same options (plan and quantize each in a fresh process, as a user runs them)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "maverick_quant", "plan", str(tiny_llama4_dir), *RUN_OPTIONS, "--json",
                    str(tmp_path / "plan.json")], check=True, env=env, stdout=subprocess.DEVNULL)
    predicted = json.loads((tmp_path / "plan.json").read_text())["peak_host_bytes"] / 2**20
    subprocess.run([sys.executable, "-m", "maverick_quant", "quantize", str(tiny_llama4_dir), "--data", str(small_text_file),
                    *RUN_OPTIONS, "--out", str(tmp_path / "bundle"), "--no-progress"], check=True, env=env)
    measured = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["summary"]["peak_rss_mib"]
    print(f"\nplan {predicted:.0f} MiB, measured {measured:.0f} MiB ({predicted / measured - 1:+.1%})")
    assert abs(predicted / measured - 1) <= 0.25


def test_plan_takes_the_busiest_experts_inputs_from_measured_coverage(tiny_llama4_dir: Path, tmp_path: Path) -> None:
    """`plan --coverage`: the routed inputs of the busiest chunk and the busiest expert's
    intermediates grow when one expert takes every token (8 x 64 tokens, hidden 64,
    expert intermediate 32), over even routing; only experts that fall back to `mixed` hold
    an all-token sample; a coverage file of another model is refused."""
    from maverick_quant.jobs import run_plan
    from maverick_quant.recipe import CalibSpec, QuantizeSpec, MoESpec

    spec, calib = QuantizeSpec(moe=MoESpec(chunk_mib=2)), CalibSpec(samples=8, seq_len=64)
    hot = tmp_path / "coverage.json"
    hot.write_text(json.dumps({"layers": {"1": [512] + [0] * 7, "3": [512] + [0] * 7}, "tokens": 512}))
    even = run_plan(str(tiny_llama4_dir), spec, calib, device="cpu").layers[1].memory["expert_inputs"]
    busy = run_plan(str(tiny_llama4_dir), spec, calib, device="cpu", coverage=hot).layers[1].memory["expert_inputs"]
    # one chunk holds all 8 experts (2 MiB). Even: 64 tokens each < min_tokens 128, so all 8 fall back to
    # `mixed` and hold a 512-token sample [512, 64]; hot: expert 0 (512 tokens) is routed, the 7 others mixed.
    # The busiest expert's three [n, 32] intermediates: hot, expert 0's 512 routed rows (a mixed one's
    # 0 + 512 sampled rows tie it); even, 64 routed + 512 sampled rows (a mixed down Hessian reads both).
    assert even == (8 * 64 + 8 * 512) * 64 * 4 + 3 * (64 + 512) * 32 * 4
    assert busy - even == 3 * (512 - (64 + 512)) * 32 * 4 - 512 * 64 * 4
    assert busy == (512 + 7 * 512) * 64 * 4 + 3 * 512 * 32 * 4
    # with min_tokens 1 no expert falls back, so none holds a sample
    routed_only = QuantizeSpec(moe=MoESpec(chunk_mib=2, min_tokens=1))
    assert run_plan(str(tiny_llama4_dir), routed_only, calib, device="cpu").layers[1].memory["expert_inputs"] == \
        512 * 64 * 4 + 3 * 64 * 32 * 4
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"layers": {"1": [10] * 4}}))
    result = CliRunner().invoke(cli, ["plan", str(tiny_llama4_dir), "--coverage", str(other)])
    assert result.exit_code == 2 and "layer 1 with 4 experts is not an MoE layer of this model" in result.output
    (tmp_path / "bad.json").write_text("{not json")
    result = CliRunner().invoke(cli, ["plan", str(tiny_llama4_dir), "--coverage", str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "bad.json: cannot read coverage.json" in result.output


def test_plan_times_the_disk_work_at_rates_measured_here(tmp_path: Path, monkeypatch) -> None:
    """The disk rates are measured in a probe file that is removed (and cached per disk); the
    plan reads the checkpoint once, writes the bundle and the hidden states after each of
    Maverick's 48 layers, hashes the bundle once, and divides each by its measured rate."""
    import maverick_quant.disk as disk
    from maverick_quant.disk import DiskRates, measure_disk

    rates = measure_disk(tmp_path, cache_dir=tmp_path / "cache")
    assert min(rates.write, rates.read, rates.hash) > 0 and str(tmp_path) in rates.where
    assert not list(tmp_path.glob(".maverick-quant-disk-probe-*"))
    again = measure_disk(tmp_path, cache_dir=tmp_path / "cache")
    assert (again.write, again.read, again.hash) == (rates.write, rates.read, rates.hash) and "kept in" in again.where
    for cache in (tmp_path / "cache").glob("*.json"):  # a truncated cache is measured again, never a traceback
        cache.write_text('{"write": 1')
    assert "kept in" not in measure_disk(tmp_path, cache_dir=tmp_path / "cache").where
    assert "kept in" not in measure_disk(tmp_path, cache_dir=tmp_path / "cache", remeasure=True).where

    fixed = DiskRates(write=1e9, read=2e9, hash=5e8, where="test")
    monkeypatch.setattr(disk, "measure_disk", lambda *args: fixed)
    result = CliRunner().invoke(cli, ["plan", "maverick", "--samples", "512", "--seq-len", "2048", "--device", "cuda",
                                      "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    io, hidden = plan["disk_io_bytes"], 512 * 2048 * 5120 * 4
    assert 7.8e11 < io["read"] < 8.3e11  # 400 B parameters in bf16 and the vision tower, read once
    assert io["write"] == plan["outputs"]["bundle"] + 47 * hidden and io["hash"] == plan["outputs"]["bundle"]
    assert plan["disk_seconds"] == {"read": io["read"] / 2e9, "write": io["write"] / 1e9, "hash": io["hash"] / 5e8}
    assert plan["disk_bytes"] == plan["outputs"]["bundle"] + 2 * hidden + max(
        size for name, size in plan["outputs"].items() if name != "bundle")
    assert f"disk {sum(plan['disk_seconds'].values()):.0f} s" in result.output

    def unwritable(*args):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(disk, "measure_disk", unwritable)  # e.g. plan run from a read-only directory
    result = CliRunner().invoke(cli, ["plan", "maverick", "--samples", "8", "--seq-len", "64"])
    assert result.exit_code == 0 and "disk work not timed: its rates could not be measured here" in result.output


RATES = {"matmul_flops_per_s": 1e12, "gptq_flops_per_s": 5e11, "gptq_column_seconds": 1e-4,
         "clip_search_seconds_per_weight": 2e-8, "dequantize_seconds_per_weight": 2e-9, "rtn_seconds_per_weight": 3e-8,
         "round_seconds_per_weight": 1e-8, "threads": 2, "model": COST_MODEL, "device": "cpu"}  # known rates in place of measured ones


def _planned(tmp_path: Path, *options: str) -> dict:
    out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
    result = CliRunner().invoke(cli, ["plan", "maverick", "--samples", "8", "--seq-len", "64", *options, "--json", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_plan_prices_awqs_searches_at_the_measured_rounding_rate(tmp_path: Path, monkeypatch) -> None:
    """AWQ's scale and clip searches on Maverick: every weight they round costs the measured
    rounding rate, so the time they add moves with that rate alone; twice the scale grid adds the
    searches' rounding and candidate outputs again. `awq` then rounds every weight to nearest at
    the measured rate, without a solve, `awq+gptq` solves as GPTQ does; both read the
    routed experts twice (the block scale search)."""
    import maverick_quant.compute_rates as compute_rates

    rates = dict(RATES)
    monkeypatch.setattr(compute_rates, "machine_rates", lambda *args: rates)
    gptq, awq, both = (_planned(tmp_path, "--method", m, *(["--no-awq-clip"] if m != "gptq" else []))  # gptq reads no awq options
                       for m in ("gptq", "awq", "awq+gptq"))
    rates["rtn_seconds_per_weight"] *= 2
    both_slower = _planned(tmp_path, "--method", "awq+gptq", "--no-awq-clip")
    searches = both["compute_seconds"] - gptq["compute_seconds"]
    rounding = both_slower["compute_seconds"] - both["compute_seconds"]  # = rounded weights x 3e-8
    assert 0 < rounding < searches
    rates["rtn_seconds_per_weight"] /= 2
    wide = _planned(tmp_path, "--method", "awq+gptq", "--no-awq-clip", "--awq-grid", "40")
    assert wide["compute_seconds"] - both["compute_seconds"] == pytest.approx(searches, rel=0.02)  # all g-terms
    # awq: the searches and every weight rounded to nearest (closed form, no solve); awq+gptq:
    # also every linear's solve and Hessian
    assert searches < awq["compute_seconds"] < both["compute_seconds"]
    assert 0 < both["compute_seconds"] - awq["compute_seconds"] < gptq["compute_seconds"]
    experts = 24 * 128 * 3 * 5120 * 8192 * 2  # Maverick's routed experts in bf16
    assert both["disk_io_bytes"]["read"] - gptq["disk_io_bytes"]["read"] == pytest.approx(experts, rel=0.01)
    assert "awq_search" in both["peak_layer"] and "awq_search" not in gptq["peak_layer"]
    # awq alone builds no Hessian: no dense ones, and its expert chunk holds weights only
    assert "hessians" not in awq["peak_layer"] and "hessians" in both["peak_layer"]
    assert awq["peak_layer"]["experts"] < both["peak_layer"]["experts"] == gptq["peak_layer"]["experts"]
    rates["round_seconds_per_weight"] *= 3
    awq_slower = _planned(tmp_path, "--method", "awq", "--no-awq-clip")
    assert awq_slower["compute_seconds"] - awq["compute_seconds"] == pytest.approx(2e-8 * awq["quantized_params"])


@pytest.mark.parametrize("tokens", [40, 300])
def test_the_planned_clip_flops_are_what_the_clip_search_computes(tokens: int) -> None:
    """plan_awq.clip_flops equals the matmul flops torch's flop counter sees in one clip search,
    through the sample itself (40 rows <= group width 64) and through the groups' second
    moments (300 rows, the moments built once)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from maverick_quant.compress.awq import clip_weights
    from maverick_quant.plan_awq import clip_candidates, clip_flops
    from maverick_quant.recipe import AWQSpec, QuantSpec

    awq = AWQSpec(clip=True)
    with FlopCounterMode(display=False) as counter:
        clip_weights(torch.randn(48, 256), torch.randn(tokens, 256), QuantSpec(bits=4, group_size=64), awq)
    assert counter.get_total_flops() == clip_flops(tokens, 48, 256, 64, clip_candidates(awq))


def test_a_pass_is_priced_up_to_where_it_stops() -> None:
    """GPTQ's and AWQ's sampling passes stop at their group's input: a Maverick dense layer's
    pass to q/k computes nothing, to v the q/k projections, to o the three and the attention,
    to gate/up and down what precedes them; a whole pass every linear and the attention. In an
    MoE layer a whole pass ends at the block (attention only)."""
    from maverick_quant.arch.llama4 import maverick_config
    from maverick_quant.arch.registry import table_for
    from maverick_quant.plan_passes import attention_flops, pass_flops
    from maverick_quant.recipe import CalibSpec

    config = maverick_config()
    table = table_for(config)
    text = table.text_config(config)
    dense, moe = table.plan(text, 0), table.plan(text, 1)
    q, kv, o, mlp = 40 * 128 * 5120, 8 * 128 * 5120, 5120 * 40 * 128, 5120 * 16384
    expected = {"self_attn.q_proj": (0, False), "self_attn.v_proj": (q + kv, False),
                "self_attn.o_proj": (q + 2 * kv, True), "feed_forward.gate_proj": (q + 2 * kv + o, True),
                "feed_forward.down_proj": (q + 2 * kv + o + 2 * mlp, True), None: (q + 2 * kv + o + 3 * mlp, True)}
    assert {name: (dense.params_before(name), dense.attends_before(name)) for name in expected} == expected
    assert (moe.params_before(), moe.attends_before()) == (q + 2 * kv + o, True)
    calib = CalibSpec(samples=4, seq_len=2048)
    attention = attention_flops(text, dense, 4 * 2048, 2048)
    assert attention == 4 * 4 * 2048 * 2048 * 40 * 128  # every key of the 2048-token window (chunks of 8192)
    assert pass_flops(text, dense, calib, "self_attn.o_proj") == 2 * 4 * 2048 * (q + 2 * kv) + attention
    # GPTQ: q/k's pass computes nothing; the values' runs the attention module whole (o_proj
    # before its hook stops the pass); o's stops at its input, which it keeps: gate/up's and
    # down's passes and the output pass replay it (o_proj and the MLP only)
    from maverick_quant.calibration.capture import mixed_hessian_flops
    from maverick_quant.plan_passes import gptq_passes

    tokens = 4 * 2048
    forward, hessian = gptq_passes(dense, text, calib, set(dense.linears))
    attn = q + 2 * kv + o
    passes = [attn, q + 2 * kv, o, o + 2 * mlp, o + 3 * mlp]
    assert forward == 2 * tokens * sum(passes) + 2 * attention  # v's and o's compute the attention
    moe_forward, _ = gptq_passes(moe, text, calib, {name for group in moe.groups for name in group.linears})
    assert moe_forward == 2 * tokens * (attn + q + 2 * kv + o) + 2 * attention  # the pass to the block replays
    assert hessian == 2 * tokens * (2 * 5120**2 + (40 * 128) ** 2 + 16384**2) + 4 * mixed_hessian_flops(8, 5, 2048, 5120)
    assert gptq_passes(dense, text, calib, set()) == (2 * tokens * (attn + 3 * mlp) + attention, 0.0)  # output pass only
    # --no-true-sequential: the values' pass, one pass to down's input for the other groups, the output pass
    assert gptq_passes(dense, text, calib, set(dense.linears), true_sequential=False) == (
        2 * tokens * (attn + (attn + 2 * mlp) + (attn + 3 * mlp)) + 3 * attention, hessian)


@pytest.mark.parametrize("repeat,length,width", [(3, 64, 32), (3, 16, 200)])
def test_the_planned_attention_mixed_hessian_is_what_add_mixed_computes(repeat: int, length: int, width: int) -> None:
    """capture.mixed_hessian_flops equals torch's flop count of `add_mixed` over 3 windows, in
    either of the forms it picks (M = P^T P first for short windows, z = P X otherwise)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from maverick_quant.calibration.capture import HessianAccumulator, mixed_hessian_flops

    accumulator = HessianAccumulator(width, (2,))
    with FlopCounterMode(display=False) as counter:
        accumulator.add_mixed(torch.randn(3, length, width), torch.rand(3, 2 * repeat, length, length))
    assert counter.get_total_flops() == 3 * mixed_hessian_flops(2, repeat, length, width)


def test_plan_rounds_rtn_experts_instead_of_solving_them(tmp_path: Path, monkeypatch) -> None:
    """Experts under `rtn` (the policy, or starved ones falling back to it) are rounded in closed
    form: against the routed solve (every expert has its 4 even-routed tokens of 512, min_tokens
    1), the plan drops each expert's three GPTQ solves, its two Hessians (gate/up share one) and
    the gate/up pass that feeds down's, and adds its weights at the measured rounding rate,
    and nothing else."""
    import maverick_quant.compute_rates as compute_rates
    from maverick_quant.compute_rates import gptq_flops

    monkeypatch.setattr(compute_rates, "machine_rates", lambda *args: RATES)
    routed = _planned(tmp_path, "--moe-policy", "routed", "--moe-min-tokens", "1")
    rtn = _planned(tmp_path, "--moe-policy", "rtn")
    starved = _planned(tmp_path, "--moe-fallback", "rtn", "--moe-min-tokens", "100000")  # every expert falls back

    def solve(n: int, k: int) -> float:
        return k * RATES["gptq_column_seconds"] + gptq_flops(n, k) / RATES["gptq_flops_per_s"]

    experts, hidden, inter, routed_tokens = 24 * 128, 5120, 8192, 8 * 64
    per_layer = 2 * routed_tokens * (hidden**2 + inter**2) + 2 * routed_tokens * 2 * hidden * inter
    saved = experts * (2 * solve(inter, hidden) + solve(hidden, inter)) + 24 * per_layer / RATES["matmul_flops_per_s"]
    rounding = RATES["round_seconds_per_weight"] * experts * 3 * hidden * inter
    for plan in (rtn, starved):
        assert routed["compute_seconds"] - plan["compute_seconds"] == pytest.approx(saved - rounding, rel=1e-9)


def test_plan_adds_the_measured_range_search_time_for_every_quantized_weight(tmp_path: Path, monkeypatch) -> None:
    """`--clip-search` costs its measured seconds per weight on each of Maverick's ~386 B
    quantized weights, on top of the same GPTQ solves; with RTN it is the whole compute time."""
    import maverick_quant.compute_rates as compute_rates

    rates = {**RATES, "clip_search_seconds_per_weight": 2e-8}
    monkeypatch.setattr(compute_rates, "machine_rates", lambda *args: rates)

    def planned(*options: str) -> dict:
        out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
        calibration = [] if "rtn" in options else ["--samples", "8", "--seq-len", "64"]  # rtn reads none
        result = CliRunner().invoke(cli, ["plan", "maverick", *calibration, *options, "--json", str(out)])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())

    plain, searched = planned("--method", "gptq"), planned("--method", "gptq", "--clip-search")
    assert searched["compute_seconds"] - plain["compute_seconds"] == pytest.approx(2e-8 * plain["quantized_params"])
    rounding = 1e-8 * plain["quantized_params"]  # RTN's whole compute: every weight rounded at the measured rate
    assert planned("--method", "rtn")["compute_seconds"] == pytest.approx(rounding)
    assert planned("--method", "rtn", "--clip-search")["compute_seconds"] == pytest.approx(rounding + 2e-8 * plain["quantized_params"])
    assert "range search (clip_search) 20.0 s per billion weights" in CliRunner().invoke(
        cli, ["plan", "maverick", "--samples", "8", "--seq-len", "64"]).output


def test_the_measured_range_search_rate_is_what_one_solve_with_it_adds(tmp_path: Path, monkeypatch) -> None:
    """The cached rates carry the search's seconds per weight: what the search adds to the
    larger probe solve (timings replaced by known ones: 1 us per column and 1 ns per flop, and
    0.05 s more with the search), divided by that solve's weights."""
    import maverick_quant.compute_rates as compute_rates

    def solve_seconds(rows: int, cols: int, device, clip_search: bool = False) -> float:
        return 1e-6 * cols + 1e-9 * compute_rates.gptq_flops(rows, cols) + (0.05 if clip_search else 0.0)

    monkeypatch.setattr(compute_rates, "_gptq_seconds", solve_seconds)
    rates = compute_rates.machine_rates(tmp_path / "rates.json", "cpu")
    assert rates == json.loads((tmp_path / "rates.json").read_text()) and rates["model"] == compute_rates.COST_MODEL
    for broken in ("{", "{}", json.dumps({**rates, "model": compute_rates.COST_MODEL - 1})):  # measured again
        (tmp_path / "rates.json").write_text(broken)
        assert compute_rates.machine_rates(tmp_path / "rates.json", "cpu")["gptq_column_seconds"] == pytest.approx(1e-6)
    assert rates["clip_search_seconds_per_weight"] == pytest.approx(0.05 / (2048 * 1024))
    assert rates["gptq_flops_per_s"] == pytest.approx(1e9) and rates["gptq_column_seconds"] == pytest.approx(1e-6)


def test_packed_export_sizes_count_llama4_rope_attention_as_float(tmp_path: Path) -> None:
    """GPTQ / AWQ / compressed-tensors exports write Llama 4's rope-layer q/k/v float for vLLM
    (docs/exports.md): their planned size is the same whether `keep_float` kept them at
    quantization or not, while the bundle's is not."""
    rope_attention = r"layers\.(?!(3|7|11|15|19|23|27|31|35|39|43|47)\.)\d+\.self_attn\.[qkv]_proj"
    outputs = []
    for extra in ([], ["--keep-float", rope_attention]):
        result = CliRunner().invoke(cli, ["plan", "maverick", "--samples", "8", "--seq-len", "64",
                                          "--json", str(tmp_path / f"plan{len(extra)}.json"), *extra])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads((tmp_path / f"plan{len(extra)}.json").read_text())["outputs"])
    quantized, kept = outputs
    floated = 36 * (5120 * 5120 + 2 * 5120 * 1024)  # 36 rope layers' q/k/v
    assert kept["bundle"] - quantized["bundle"] > 1.4 * floated  # 2 bytes (bf16) instead of ~0.52 (4 bits + scales)
    for fmt in ("gptq", "compressed-tensors"):
        assert abs(kept[fmt] - quantized[fmt]) <= 2, fmt


@pytest.mark.parametrize("grid", [["--bits", "4", "--sym"], ["--bits", "3", "--asym"], ["--bits", "8", "--sym"],
                                  ["--gguf-grid", "Q4_1"]])
def test_the_planned_bundle_holds_the_bytes_a_real_bundle_stores(tiny_llama_dir: Path, tmp_path: Path,
                                                                 grid: list[str]) -> None:
    """Planned bundle bytes = the tensor bytes an RTN bundle of the same grid stores: codes
    nibble-packed only at 4 bits or fewer, a uint8 zero point per group on symmetric grids too,
    Q4_1's offset-grid terms (the plan used to count bits/8 a weight and no symmetric zeros)."""
    from maverick_quant.checkpoint import read_safetensors_header

    options = [*grid, "--group-size", "32"] if grid[0] != "--gguf-grid" else grid
    result = CliRunner().invoke(cli, ["plan", str(tiny_llama_dir), "--method", "rtn", *options, "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["quantize", str(tiny_llama_dir), "--method", "rtn", *options, "--out",
                                      str(tmp_path / "bundle"), "--no-progress"])
    assert result.exit_code == 0, result.output
    stored = sum(info.end - info.begin for shard in (tmp_path / "bundle").rglob("*.safetensors")
                 for info in read_safetensors_header(shard).values())
    assert json.loads((tmp_path / "p.json").read_text())["outputs"]["bundle"] == stored


def test_rates_measured_under_load_are_flagged_and_replaced_when_the_machine_is_idle(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """Rates cached while other work shared the cores (here, clip search measured 74x slower)
    were kept for good: the plan overstated every later run's time with no word of it. They
    record when and under what load they were measured; a busy measurement is flagged in the
    plan and replaced by the first plan on an idle machine; `--remeasure` measures again."""
    import maverick_quant.compute_rates as compute_rates

    solves = []
    monkeypatch.setattr(compute_rates, "_gptq_seconds", lambda rows, cols, device, clip_search=False:
                        solves.append(rows) or 1e-6 * cols + 1e-9 * compute_rates.gptq_flops(rows, cols))
    cache, load = tmp_path / "rates.json", {"now": 3.5}
    monkeypatch.setattr(compute_rates, "load_per_core", lambda: load["now"])
    busy = compute_rates.machine_rates(cache, "cpu")
    assert busy["load_per_core"] == 3.5 and compute_rates.measured_busy(busy) and busy["measured_at"].endswith("UTC")
    measured = len(solves)
    assert compute_rates.machine_rates(cache, "cpu") == busy and len(solves) == measured  # still busy: kept
    monkeypatch.setattr(compute_rates, "machine_rates", lambda *args: busy)
    out = CliRunner().invoke(cli, ["plan", "maverick", "--samples", "8", "--seq-len", "64"]).output
    assert "- warning: the compute rates were measured while other work shared the cores (load 3.5 per core)" in out
    assert f"rates measured here {busy['measured_at']} under a load of 3.5 per core" in out
    monkeypatch.undo()
    monkeypatch.setattr(compute_rates, "_gptq_seconds", lambda rows, cols, device, clip_search=False:
                        solves.append(rows) or 1e-6 * cols + 1e-9 * compute_rates.gptq_flops(rows, cols))
    monkeypatch.setattr(compute_rates, "load_per_core", lambda: load["now"])
    load["now"] = 0.1
    idle = compute_rates.machine_rates(cache, "cpu")
    assert idle["load_per_core"] == 0.1 and len(solves) > measured and not compute_rates.measured_busy(idle)
    measured = len(solves)
    assert compute_rates.machine_rates(cache, "cpu") == idle and len(solves) == measured  # idle measurement: kept
    compute_rates.machine_rates(cache, "cpu", remeasure=True)
    assert len(solves) > measured
    import maverick_quant.disk as disk

    seen = {}
    monkeypatch.setattr(compute_rates, "machine_rates", lambda cache, device, remeasure: seen.update(rates=remeasure) or idle)
    monkeypatch.setattr(disk, "measure_disk", lambda folder, model, cache, remeasure: seen.update(disk=remeasure)
                        or disk.DiskRates(1e9, 1e9, 1e9, "test"))
    for flag in ([], ["--remeasure"]):
        assert CliRunner().invoke(cli, ["plan", "maverick", "--samples", "8", "--seq-len", "64", *flag]).exit_code == 0
        assert seen == {"rates": bool(flag), "disk": bool(flag)}


def test_plan_notes_a_calibration_with_fewer_tokens_than_a_solved_linear_reads(tiny_llama_dir: Path,
                                                                                tmp_path: Path) -> None:
    """`plan` says before the run what `quantize` would note at its start: GPTQ solving linears
    whose input width K exceeds the calibration's tokens (the tiny Llama's 3 down_proj read
    K = 160, the rest 96), in its report and its JSON."""
    def planned(*options: str) -> tuple[str, list[str]]:
        out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
        result = CliRunner().invoke(cli, ["plan", str(tiny_llama_dir), *options, "--json", str(out)])
        assert result.exit_code == 0, result.output
        return result.output, json.loads(out.read_text())["notes"]

    output, notes = planned("--samples", "1", "--seq-len", "128")
    assert len(notes) == 1 and "holds 128 tokens, fewer than the input width of 3 linears" in notes[0], notes
    assert "model.layers.0.mlp.down_proj (K=160)" in notes[0] and "at least 160 tokens" in notes[0], notes
    assert f"- {notes[0]}" in output
    assert planned("--samples", "2", "--seq-len", "80")[1] == []  # 160 tokens meet K = 160
    assert planned("--samples", "1", "--seq-len", "64", "--method", "awq")[1] == []  # AWQ solves no GPTQ


def test_a_dense_layer_solved_true_sequentially_holds_its_attention_outputs() -> None:
    """The kept inputs of the attention's output projection (attention_replay.py) are a host
    term of S x L x H_q x head_dim, in Maverick's dense layers (on the CPU an MoE layer's peak
    comes after they are freed; on a GPU its host memory holds them, then the expert reads),
    when a group after q/k/v is solved true-sequentially."""
    from maverick_quant.arch.llama4 import maverick_config
    from maverick_quant.arch.registry import table_for
    from maverick_quant.plan import layer_cost
    from maverick_quant.recipe import CalibSpec, QuantizeSpec

    config = maverick_config()
    table = table_for(config)
    text, calib = table.text_config(config), CalibSpec(samples=4, seq_len=2048)

    def memory(index: int, device: str = "cpu", **spec) -> dict:
        return layer_cost(table, text, index, calib, QuantizeSpec(**spec), device)[0].memory

    assert memory(0)["attention_outputs"] == memory(0)["cache"] == 4 * 2048 * (40 * 128) * 4  # o_proj's input width
    assert "attention_outputs" not in memory(1)  # an MoE layer frees them before it reads its experts, its peak
    assert memory(1, "cuda")["attention_outputs"] == memory(0)["attention_outputs"]  # on a GPU: beside the host's expert reads
    assert "attention_outputs" not in memory(0, true_sequential=False)
    assert memory(0, keep_float=("feed_forward",))["attention_outputs"]  # o's pass keeps them for the output pass
    assert "attention_outputs" not in memory(0, keep_float=("o_proj", "feed_forward"))  # no group solved after q/k/v
