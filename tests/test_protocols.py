"""Evaluation protocols: GPTQ paper (all tokens) and llama.cpp (BOS first, second half scored)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from click.testing import CliRunner

from maverick_quant.calibration.data import adds_bos, eval_windows, load_tokenizer, scored_from
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
    tokenizer = load_tokenizer(tiny_llama_dir)  # SmolLM2's: has a BOS token, but does not add it
    gptq = eval_windows(small_text_file, tokenizer, 32, 3)
    llama = eval_windows(small_text_file, tokenizer, 32, 3, "llama.cpp")
    assert not adds_bos(tokenizer) and gptq[0, 0] == tokenizer.bos_token_id and gptq[1, 0] != tokenizer.bos_token_id
    # llama-perplexity adds BOS only where the vocabulary does: the plain text, one token earlier
    assert torch.equal(llama.flatten()[: 3 * 32 - 1], gptq.flatten()[1:]) and not (llama == tokenizer.bos_token_id).any()
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


class _BosTokenizer:
    """A word-level tokenizer that adds BOS (id 1) as Llama 3 and 4's do."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self):
        self.vocabulary: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [self.vocabulary.setdefault(word, len(self.vocabulary) + 3) for word in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocabulary)


def test_llama_cpp_protocol_puts_bos_first_in_every_window_where_the_vocabulary_adds_it(small_text_file: Path) -> None:
    tokenizer = _BosTokenizer()
    gptq = eval_windows(small_text_file, tokenizer, 16, 4)
    llama = eval_windows(small_text_file, tokenizer, 16, 4, "llama.cpp")
    assert adds_bos(tokenizer) and (llama[:, 0] == 1).all() and torch.equal(llama[:, 1:], gptq[:, 1:])
    assert gptq[0, 0] == 1 and not (gptq[1:, 0] == 1).any()


def test_a_window_with_no_scored_token_is_refused_before_any_work(tiny_llama_dir: Path, small_text_file: Path,
                                                                   tmp_path: Path) -> None:
    """--ctx 2 under the llama.cpp protocol scores positions 2..1: nothing. Refused up front (the
    whole evaluation used to run first, then fail with 'no tokens were scored')."""
    from click.testing import CliRunner

    from maverick_quant.cli import cli

    result = CliRunner().invoke(cli, ["validate", "--reference", str(tiny_llama_dir), "--candidate", str(tiny_llama_dir),
                                      "--data", str(small_text_file), "--ctx", "2", "--protocol", "llama.cpp",
                                      "--report", str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 2 and "--ctx 2 with protocol llama.cpp: no token of a window is scored" in result.output
    assert not (tmp_path / "r").exists()
