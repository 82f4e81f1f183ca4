"""MoE quality on real text: SmolLM2 upcycled into the Llama 4 layout (uneven routing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from maverick_quant.cli import cli
from maverick_quant.synthetic import upcycle_to_llama4


def _fidelity(model: Path, candidate: Path, data: Path, report: Path) -> tuple[float, float]:
    """(mean KL divergence to the float model, perplexity ratio) over 8 windows of 256 tokens."""
    result = CliRunner().invoke(cli, ["validate", "--reference", str(model), "--candidate", str(candidate), "--data",
                                      str(data), "--ctx", "256", "--max-windows", "8", "--report", str(report),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((report / "report.json").read_text())
    return summary["kl"]["mean"], summary["ppl_ratio"]


@pytest.mark.slow
def test_gptq_beats_rtn_on_the_upcycled_moe_for_every_policy(smollm2_dir: Path, wiki_valid_path: Path,
                                                             wiki_test_path: Path, tmp_path: Path) -> None:
    """4 experts on layers 1, 9, 17, 25; 16 x 512 calibration tokens: per-expert GPTQ must be
    clearly closer to the float model than RTN (mean KL at most 0.8x RTN's) under each policy.
    The perplexity ratio is printed, not asserted: with 330-4000 routed tokens per expert the
    down projections' routed Hessians (K = 1536) are rank-deficient, and the routed policy's
    perplexity moved from 1.245 to 1.364 between two BLAS code paths of one CPU (RTN: 1.446)."""
    model = upcycle_to_llama4(smollm2_dir, tmp_path / "model", num_experts=4, moe_every=8)
    runner = CliRunner()
    result = runner.invoke(cli, ["calibrate", str(model), "--data", str(wiki_valid_path), "--samples", "16",
                                 "--seq-len", "512", "--out", str(tmp_path / "calib")])
    assert result.exit_code == 0, result.output
    kl, ratios = {}, {}
    calib = ["--calib", str(tmp_path / "calib")]
    for name, options in {"rtn": ["--method", "rtn"], "routed": [*calib, "--moe-policy", "routed", "--moe-min-tokens", "64"],
                          "mixed": [*calib, "--moe-policy", "mixed"]}.items():
        result = runner.invoke(cli, ["quantize", str(model), "--group-size", "64", "--out", str(tmp_path / name),
                                     "--no-progress", *options])
        assert result.exit_code == 0, result.output
        kl[name], ratios[name] = _fidelity(model, tmp_path / name, wiki_test_path, tmp_path / f"report-{name}")
    print(f"upcycled MoE: mean KL {kl}, ppl ratios {ratios}")
    for policy in ("routed", "mixed"):
        assert kl[policy] < 0.8 * kl["rtn"], (kl, ratios)
