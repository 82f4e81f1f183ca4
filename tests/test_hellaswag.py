"""Multiple-choice drift: HellaSwag parsing and llama.cpp-style scoring, JSONL tasks, CLI gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maverick_quant.calibration.data import load_tokenizer
from maverick_quant.cli import cli
from maverick_quant.errors import InputError
from maverick_quant.streaming import open_source
from maverick_quant.validation.hellaswag import (Task, accuracy_drift, encode_tasks, model_choice_scores,
                                                 read_choice_jsonl, read_hellaswag)
from tests.conftest import SHARED_DATA

HELLASWAG = SHARED_DATA / "hellaswag" / "hellaswag_val_full.txt"


@pytest.fixture
def hellaswag_file() -> Path:
    if not HELLASWAG.is_file():
        pytest.skip(f"{HELLASWAG} not present")
    return HELLASWAG


def test_real_hellaswag_tasks_parse(hellaswag_file: Path) -> None:
    tasks = read_hellaswag(hellaswag_file, limit=5)
    assert len(tasks) == 5 and all(len(t.choices) == 4 and 0 <= t.label < 4 for t in tasks)
    assert tasks[0].context.startswith("Roof shingle removal") and tasks[0].label == 3


def test_malformed_files_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("ctx\nseven\na\nb\nc\nd\n")
    with pytest.raises(InputError, match=r"bad.txt:2: label 'seven'"):
        read_hellaswag(bad)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n{"context": "b"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2"):
        read_choice_jsonl(jsonl)


def test_scores_are_mean_logprobs_of_the_ending_tokens(tiny_llama_dir: Path) -> None:
    """Against a whole-model transformers computation, one choice at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_llama_dir)
    tasks = [Task("The cat sat on the", ("mat.", "big red chair near the window."), 0),
             Task("Rain fell all day, so we", ("stayed in.", "went out.", "slept"), 2)]
    batch = encode_tasks(tasks, tokenizer)
    scores = model_choice_scores(open_source(tiny_llama_dir), batch)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for row in range(batch.ids.shape[0]):
        ids = batch.ids[row, : batch.length[row]][None]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        first = int(batch.first[row])
        expected = logprobs[first - 1 :].gather(-1, ids[0, first:, None]).mean()
        assert torch.isclose(scores[row], expected, atol=1e-4)
    assert batch.task.tolist() == [0, 0, 1, 1, 1]


def test_paired_drift_interval() -> None:
    ref = torch.tensor([True] * 60 + [False] * 40)
    cand = torch.tensor([True] * 55 + [False] * 5 + [True] * 2 + [False] * 38)
    drift = accuracy_drift(ref, cand)
    assert drift["reference"]["acc"] == pytest.approx(60) and drift["candidate"]["acc"] == pytest.approx(57)
    assert drift["delta"] == pytest.approx(-3)
    assert drift["only_reference_right"] == 5 and drift["only_candidate_right"] == 2
    assert 0 < drift["delta_ci95"] < 1.96 * 100 * (7 / 100**2) ** 0.5 + 1e-9


def test_validate_gates_on_hellaswag_delta(tiny_llama_dir: Path, hellaswag_file: Path, small_text_file: Path,
                                           tmp_path: Path) -> None:
    tasks = tmp_path / "mc.jsonl"
    tasks.write_text("\n".join(json.dumps({"context": t.context, "choices": list(t.choices), "label": t.label})
                               for t in read_hellaswag(hellaswag_file, 3)))
    result = CliRunner().invoke(cli, ["validate", "--reference", str(tiny_llama_dir), "--candidate", str(tiny_llama_dir),
                                      "--data", str(small_text_file), "--ctx", "32", "--max-windows", "1",
                                      "--hellaswag", str(hellaswag_file), "--hellaswag-tasks", "6", "--choices", str(tasks),
                                      "--report", str(tmp_path / "r"), "--gate", "hellaswag.delta>=-1.0", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["hellaswag"]["tasks"] == 6 and report["hellaswag"]["delta"] == 0
    assert report["multiple_choice"]["tasks"] == 3


def test_one_sequence_at_a_time_scoring_equals_the_padded_batch_scoring() -> None:
    """window_choice_scores (the GGUF path: one unpadded sequence per call) gives the scores
    choice_scores computes from the right-padded batch, for a causal stand-in model whose
    logits at position j depend on token j only."""
    from maverick_quant.validation.hellaswag import ChoiceBatch, choice_scores, window_choice_scores

    table = torch.randn(50, 50, generator=torch.Generator().manual_seed(7))

    class Causal:
        def window_logits(self, ids: list[int]) -> torch.Tensor:
            return table[torch.tensor(ids)]

    ids = torch.tensor([[1, 5, 6, 7, 0, 0], [1, 5, 6, 9, 9, 3], [1, 8, 2, 0, 0, 0]])
    batch = ChoiceBatch(ids, torch.tensor([2, 2, 1]), torch.tensor([4, 6, 3]), torch.tensor([0, 0, 1]))
    batched = choice_scores(torch.log_softmax(table[ids[:, :-1]].double(), -1), batch)
    torch.testing.assert_close(window_choice_scores(Causal(), batch), batched)
