"""MoE quality on real text: SmolLM2 upcycled into the Llama 4 layout (uneven routing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from maverick_quant.cli import cli
from maverick_quant.synthetic import upcycle_to_llama4


def _ppl_ratio(model: Path, candidate: Path, data: Path, report: Path) -> float:
    result = CliRunner().invoke(cli, ["validate", "--reference", str(model), "--candidate", str(candidate), "--data",
                                      str(data), "--ctx", "256", "--max-windows", "8", "--report", str(report),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    return json.loads((report / "report.json").read_text())["ppl_ratio"]


@pytest.mark.slow
def test_gptq_beats_rtn_on_the_upcycled_moe_for_every_policy(smollm2_dir: Path, wiki_valid_path: Path,
                                                             wiki_test_path: Path, tmp_path: Path) -> None:
    """4 experts on layers 1, 9, 17, 25; 16 x 512 calibration tokens: per-expert GPTQ must
    close a clear part (>= 20%) of RTN's perplexity gap under each policy."""
    model = upcycle_to_llama4(smollm2_dir, tmp_path / "model", num_experts=4, moe_every=8)
    runner = CliRunner()
    result = runner.invoke(cli, ["calibrate", str(model), "--data", str(wiki_valid_path), "--samples", "16",
                                 "--seq-len", "512", "--out", str(tmp_path / "calib")])
    assert result.exit_code == 0, result.output
    ratios = {}
    for name, options in {"rtn": ["--method", "rtn"], "routed": ["--moe-policy", "routed", "--moe-min-tokens", "64"],
                          "mixed": ["--moe-policy", "mixed"]}.items():
        result = runner.invoke(cli, ["quantize", str(model), "--calib", str(tmp_path / "calib"), "--group-size", "64",
                                     "--out", str(tmp_path / name), "--no-progress", *options])
        assert result.exit_code == 0, result.output
        ratios[name] = _ppl_ratio(model, tmp_path / name, wiki_test_path, tmp_path / f"report-{name}")
    print(f"upcycled MoE ppl ratios: {ratios}")
    for policy in ("routed", "mixed"):
        assert ratios[policy] - 1 < 0.8 * (ratios["rtn"] - 1), ratios
