"""GPTQModel 7.6.0, the client most GPTQ/AWQ users load with, reads our exports and computes
what our dequantized bundle computes: dense GPTQ (4-bit sym and asym, 8-bit) and AWQ through
transformers, and GPTQ through `GPTQModel.load` for a dense Llama (also with 8-bit q/k/v by
bits overrides) and a tiny Llama 4 MoE.

GPTQModel pins numpy 2.2.6, so `.ci/run` installs it (with optimum, which transformers' GPTQ
path needs) in its own virtual environment over ours and names its python in
MAVERICK_QUANT_GPTQMODEL_PYTHON; the client runs there, in a subprocess
(tests/clients/gptqmodel_logits.py), on token ids and logits passed as .npy files.

The client computes in fp16 and we in fp32, so the logits are close, not equal. The check:
the client's distance to our bundle's logits is under a fifth of the bundle's distance to the
float model's (the quantization error), and every linear became a quantized module. A wrong
layout (e.g. AWQ's nibble order read as GPTQ's) lands as far from the bundle as the
quantization error or farther.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from maverick_quant.bundle import Bundle
from maverick_quant.cli import cli

from conftest import bundle_logits, make_tiny_llama4, model_logits

CLIENT = Path(__file__).resolve().parent / "clients" / "gptqmodel_logits.py"
PYTHON = os.environ.get("MAVERICK_QUANT_GPTQMODEL_PYTHON")
if PYTHON is None or not Path(PYTHON).is_file():
    if os.environ.get("MAVERICK_QUANT_REQUIRE_CLIENTS"):
        raise RuntimeError("MAVERICK_QUANT_GPTQMODEL_PYTHON must name the python of GPTQModel's environment "
                           "(.ci/run makes it)")
    pytest.skip("GPTQModel's environment is not installed (see .ci/run)", allow_module_level=True)


def _run(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def client_logits(export_dir: Path, loader: str, ids: torch.Tensor, tmp: Path) -> tuple[torch.Tensor, dict]:
    """Logits [B, L, V] GPTQModel's environment computes for `ids`, and what it built."""
    np.save(tmp / "ids.npy", ids.numpy(), allow_pickle=False)
    done = subprocess.run([PYTHON, str(CLIENT), str(export_dir), loader, str(tmp / "ids.npy"), str(tmp / "out.npy")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return torch.from_numpy(np.load(tmp / "out.npy", allow_pickle=False)), info


def check_client(model_dir: Path, export_dir: Path, bundle_dir: Path, loader: str, tmp: Path,
                 ids: torch.Tensor) -> float:
    """||client - bundle|| / ||bundle - float|| over the logits, after checking that no plain
    Linear was left behind but those the export lists as not converted (Llama 4's rope-layer
    q/k/v, written float for vLLM); returned for the caller's bound."""
    theirs, info = client_logits(export_dir, loader, ids, tmp)
    from transformers.quantizers.quantizers_utils import should_convert_module

    not_converted = json.loads((export_dir / "config.json").read_text())["quantization_config"].get(
        "modules_to_not_convert") or []  # matched as transformers matches them: from the start, or as a suffix
    assert info["quantized_classes"] and not [name for name in info["plain_linears"]
                                              if should_convert_module(name, not_converted)], info
    ours = bundle_logits(model_dir, Bundle(bundle_dir), ids, tmp / "dequantized")
    reference = model_logits(model_dir, ids)
    ratio = float((theirs - ours).norm() / (ours - reference).norm())
    print(f"\n{export_dir.name} via {loader} ({info['quantized_classes']}): client vs bundle {ratio:.4f} "
          "of bundle vs float")
    return ratio


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text("The river runs past the old mill and under the stone bridge. " * 200)
    return text


IDS = torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("fmt,grid,loader", [
    ("gptq", ["--bits", 4, "--group-size", 32, "--sym"], "transformers"),
    ("gptq", ["--bits", 4, "--group-size", 32, "--asym"], "transformers"),
    ("gptq", ["--bits", 8, "--group-size", 32, "--sym"], "transformers"),
    ("gptq", ["--gguf-grid", "Q4_0"], "gptqmodel"),  # 4-bit sym g32 with llama.cpp's scale rule: negative scales
    # 8-bit q/k/v in a 4-bit checkpoint: GPTQModel must follow our positive `dynamic` rules
    ("gptq", ["--bits", 4, "--group-size", 32, "--sym", "--bits-override", r"self_attn\.(q|k|v)_proj=8"], "gptqmodel"),
    ("awq", ["--bits", 4, "--group-size", 32, "--asym", "--method", "awq"], "transformers"),
])
def test_gptqmodel_runs_our_dense_export_like_our_bundle(tiny_llama_dir: Path, calibration: Path, tmp_path: Path,
                                                         fmt: str, grid: list, loader: str) -> None:
    _run("quantize", tiny_llama_dir, "--data", calibration, "--samples", 4, "--seq-len", 32, *grid,
         "--out", tmp_path / "bundle", "--no-progress")
    _run("export", tmp_path / "bundle", "--format", fmt, "--out", tmp_path / fmt)
    assert check_client(tiny_llama_dir, tmp_path / fmt, tmp_path / "bundle", loader, tmp_path, IDS) < 0.2


def test_gptqmodel_loads_our_llama4_moe_export_per_expert(smollm2_dir: Path, calibration: Path, tmp_path: Path) -> None:
    """Two client limits shape this model (GPTQModel 7.6.0 and its Defuser 0.0.28):
    - every layer is MoE (as Scout): its llama4 definition lists only the MoE block, so the
      dense MLP of Maverick's interleaved layers stays an uninitialised plain Linear (this test
      would report it through `plain_linears`);
    - the expert width (64) exceeds half the hidden size: Defuser guesses the fused experts'
      orientation from `hidden < 2 x intermediate` (Maverick: 5120 < 16384), and builds
      down_proj transposed otherwise (the tiny model's default width 32 fails to load)."""
    model_dir = make_tiny_llama4(smollm2_dir, tmp_path / "model", interleave_moe_layer_step=1, num_hidden_layers=2,
                                 intermediate_size=64)
    _run("quantize", model_dir, "--data", calibration, "--samples", 4, "--seq-len", 32, "--bits", 4,
         "--group-size", 32, "--sym", "--out", tmp_path / "bundle", "--no-progress")
    out = _run("export", tmp_path / "bundle", "--format", "gptq", "--out", tmp_path / "gptq")
    assert check_client(model_dir, tmp_path / "gptq", tmp_path / "bundle", "gptqmodel", tmp_path, IDS) < 0.2
    # transformers loads no Llama 4 GPTQ experts (GPTQModel does, in this all-MoE layout): the card and export say so
    card = next(line for line in (tmp_path / "gptq" / "README.md").read_text().splitlines() if "load with" in line)
    assert card.startswith("| load with | vLLM") and "transformers (GPTQModel loads it) load" in card, card
    assert "note: transformers (GPTQModel loads it) load this mixture of experts without an error" in out, out
