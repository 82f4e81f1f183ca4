"""Evaluation protocols: GPTQ paper (all tokens) and llama.cpp (BOS first, second half scored)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from click.testing import CliRunner

from maverick_quant.calibration.data import eval_windows, load_tokenizer, scored_from
from maverick_quant.cli import cli


def _manual_ppl(model_dir: Path, windows: torch.Tensor, first: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    logprobs = torch.log_softmax(logits[:, first - 1 : -1].double(), -1)
    nll = -logprobs.gather(-1, windows[:, first:, None]).mean()
    return math.exp(nll.item())


def test_llama_cpp_protocol_scores_second_halves_after_bos(tiny_llama_dir: Path, small_text_file: Path,
                                                           tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_llama_dir)
    gptq = eval_windows(small_text_file, tokenizer, 32, 3)
    llama = eval_windows(small_text_file, tokenizer, 32, 3, "llama.cpp")
    assert (llama[:, 0] == tokenizer.bos_token_id).all() and torch.equal(llama[:, 1:], gptq[:, 1:])
    assert gptq[0, 0] == tokenizer.bos_token_id and gptq[1, 0] != tokenizer.bos_token_id
    for protocol, windows in (("gptq", gptq), ("llama.cpp", llama)):
        result = CliRunner().invoke(cli, ["validate", "--reference", str(tiny_llama_dir), "--candidate",
                                          str(tiny_llama_dir), "--data", str(small_text_file), "--ctx", "32",
                                          "--max-windows", "3", "--protocol", protocol, "--report",
                                          str(tmp_path / protocol), "--no-progress"])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / protocol / "report.json").read_text())
        first = scored_from(protocol, 32)
        assert report["protocol"]["name"] == protocol and report["tokens"] == 3 * (32 - first)
        assert math.isclose(report["reference"]["ppl"], _manual_ppl(tiny_llama_dir, windows, first), rel_tol=1e-4)
