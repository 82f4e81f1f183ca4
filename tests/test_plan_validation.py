"""`plan`'s validation section (plan_validation.py): checked against a real `validate` process,
and its terms against the settings that should move them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from maverick_quant.cli import cli
from maverick_quant.validation.metrics import MetricAccumulator, Workspace, token_metrics
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
HELLASWAG = SHARED_DATA / "hellaswag" / "hellaswag_val_full.txt"
GIB = 2**30


def _plan(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"plan-{len(list(tmp_path.glob('plan-*')))}.json"
    result = CliRunner().invoke(cli, ["plan", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_the_maverick_validation_fits_one_gpu_and_its_terms_follow_the_settings(tmp_path: Path) -> None:
    """The shipped recipe's validation (40 x 2048 tokens, 1,000 HellaSwag tasks) on one GPU,
    and how the plan moves: more windows grow the windows' caches and block I/O in proportion
    (not the lm_head), a larger batch grows only the scoring logits."""
    common = ["maverick", "--samples", "8", "--seq-len", "64", "--device", "cuda", "--validate-ctx", "2048"]
    base = _plan(tmp_path, *common, "--validate-windows", "40", "--hellaswag-tasks", "1000")["validation"]
    assert base["gpu_bytes"] < 40 * GIB and base["peak_host_bytes"] < 16 * GIB
    assert base["choice_passes"] == 1  # 1,000 tasks of Maverick's hidden states fit one 8 GiB pass
    double = _plan(tmp_path, *common, "--validate-windows", "80", "--hellaswag-tasks", "1000")["validation"]
    assert double["write_bytes"] == 2 * base["write_bytes"] and double["disk_bytes"] == 2 * base["disk_bytes"]
    assert double["flops"] > 1.4 * base["flops"]  # the windows' share doubles; the benchmark's stays
    wide = _plan(tmp_path, *common, "--validate-windows", "40", "--validate-batch", "8")["validation"]
    assert wide["peak_gpu_phase"]["phase"] == "score" and wide["choice_passes"] == 0
    narrow = _plan(tmp_path, *common, "--validate-windows", "40", "--validate-batch", "4")["validation"]
    assert wide["peak_gpu_phase"]["logits"] == 2 * narrow["peak_gpu_phase"]["logits"]
    assert wide["peak_gpu_phase"]["final"] == narrow["peak_gpu_phase"]["final"]


def test_validation_options_need_windows() -> None:
    result = CliRunner().invoke(cli, ["plan", "maverick", "--hellaswag-tasks", "100"])
    assert result.exit_code == 2 and "--validate-windows" in result.output


@pytest.mark.slow
def test_plan_is_within_15_percent_of_a_real_validate_peak(tiny_llama4_dir: Path, small_text_file: Path,
                                                          tmp_path: Path) -> None:
    """Peak host memory planned for `validate` against the peak RSS a real validate process
    reports, each in a fresh process. The settings make the scoring phase the peak (two
    [4 x 255, 49152] fp32 logits): a fresh [rows, V] temporary per metric chunk fragmented the
    heap there and some runs peaked at 3-4x the plan."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = lambda *args: subprocess.run([sys.executable, "-m", "maverick_quant", *args], check=True, env=env,  # noqa: E731
                                       stdout=subprocess.DEVNULL)
    run("quantize", str(tiny_llama4_dir), "--method", "rtn", "--out",
        str(tmp_path / "bundle"), "--no-progress")
    settings = ["--ctx", "256", "--max-windows", "24", "--batch", "8"]
    run("plan", str(tiny_llama4_dir), "--method", "rtn", "--device", "cpu", "--validate-windows", "24", "--validate-ctx",
        "256", "--validate-batch", "8", "--validate-data", str(small_text_file), "--json", str(tmp_path / "plan.json"))
    run("validate", "--reference", str(tiny_llama4_dir), "--candidate", str(tmp_path / "bundle"), "--data",
        str(small_text_file), *settings, "--report", str(tmp_path / "report"), "--no-progress", "--device", "cpu")
    plan = json.loads((tmp_path / "plan.json").read_text())["validation"]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert plan["windows"] == report["protocol"]["windows"]  # cut from the text, as validate cuts them
    predicted, measured = plan["peak_host_bytes"] / 2**20, report["resources"]["peak_rss_mib"]
    print(f"\nplan {predicted:.0f} MiB ({plan['peak_host_phase']['phase']}), measured {measured:.0f} MiB "
          f"({predicted / measured - 1:+.1%})")
    assert plan["peak_host_phase"]["phase"] == "score"
    assert abs(predicted / measured - 1) < 0.15


def test_a_recipe_plans_its_own_validation_with_tokens_counted(tiny_llama_dir: Path, small_text_file: Path,
                                                               tmp_path: Path) -> None:
    """A recipe's validation step is planned from its files: windows cut from its text and its
    HellaSwag tasks tokenized with the model's tokenizer (not the assumed averages)."""
    if not HELLASWAG.is_file():
        pytest.skip(f"{HELLASWAG} not present")
    recipe = {"model": str(tiny_llama_dir), "quantize": {"method": "rtn", "device": "cpu"},  # rtn: no calibration
              "validation": {"data": str(small_text_file), "ctx": 64, "max_windows": 5, "hellaswag": str(HELLASWAG),
                             "hellaswag_tasks": 10}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(cli, ["plan", str(path), "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "plan.json").read_text())["validation"]
    assert plan["windows"] == 5 and plan["ctx"] == 64 and plan["choice_passes"] == 1
    assert "Validating the bundle" in result.output and "multiple-choice tokens: measured on" in result.output
    assert plan["choice_tokens"] != 10 * 168  # counted, not the full split's average


def _fresh_temporaries_metrics(ref: torch.Tensor, cand: torch.Tensor, targets: torch.Tensor):
    """The per-token metrics as computed before the workspace (fresh temporaries, torch.where)."""
    log_ref, log_cand = torch.log_softmax(ref.float(), -1), torch.log_softmax(cand.float(), -1)
    index = targets.long().unsqueeze(-1)
    p_ref = log_ref.exp()
    terms = torch.where(p_ref > 0, p_ref * (log_ref - log_cand), torch.zeros_like(p_ref))
    return (-log_ref.gather(-1, index).squeeze(-1), -log_cand.gather(-1, index).squeeze(-1),
            terms.sum(-1).clamp_min(0.0), ref.argmax(-1) == cand.argmax(-1))


def test_the_workspace_metrics_equal_the_fresh_temporaries_bit_for_bit() -> None:
    """token_metrics into one Workspace across chunks of different sizes (growing, then
    shrinking) equals the computation with fresh temporaries, including where p_ref underflows
    to 0 against a candidate that gives the token no probability (-inf: that term counts 0,
    where 0 x inf would be NaN)."""
    generator = torch.Generator().manual_seed(0)
    workspace = Workspace()
    for rows in (3, 7, 2):
        ref, cand = torch.randn(rows, 50, generator=generator), torch.randn(rows, 50, generator=generator)
        ref[0, :10], cand[0, :10] = -1e4, float("-inf")
        targets = torch.randint(10, 50, (rows,), generator=generator)
        for reused, fresh in zip(token_metrics(ref, cand, targets, workspace), _fresh_temporaries_metrics(ref, cand, targets)):
            assert torch.equal(reused, fresh)
    assert torch.isfinite(token_metrics(ref, cand, targets)[2]).all()


def test_the_accumulator_sums_the_same_whatever_its_chunk() -> None:
    generator = torch.Generator().manual_seed(1)
    ref, cand = torch.randn(33, 40, generator=generator), torch.randn(33, 40, generator=generator)
    targets = torch.randint(0, 40, (33,), generator=generator)
    whole, chunked = MetricAccumulator(chunk_elements=33 * 40), MetricAccumulator(chunk_elements=40 * 4)
    whole.update(ref, cand, targets)
    chunked.update(ref, cand, targets)
    assert chunked.summary()["kl"]["mean"] == pytest.approx(whole.summary()["kl"]["mean"], rel=1e-6)
    assert torch.equal(chunked.kl_values(), whole.kl_values())
