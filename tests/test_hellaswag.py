"""Multiple-choice drift: HellaSwag parsing and llama.cpp-style scoring, JSONL tasks, CLI gate."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maverick_quant.calibration.data import load_tokenizer
from maverick_quant.cli import cli
from maverick_quant.errors import InputError
from maverick_quant.streaming import open_source
from maverick_quant.streaming import StreamingModel
from maverick_quant.validation.hellaswag import (Task, accuracy_drift, branch_choice_scores, encode_task, pack_tasks,
                                                 read_choice_jsonl, read_hellaswag, streamed_choice_scores)
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


@pytest.mark.parametrize("record, message", [
    ('{"context": "c", "choices": "blue", "label": 0}', "list of two or more strings"),  # was split into letters
    ('{"context": "c", "choices": {"a": 1, "b": 2}, "label": 0}', "list of two or more strings"),
    ('{"context": "c", "choices": ["x", "y"], "label": 1.7}', "must be an integer"),  # was cut to 1
    ('{"context": "c", "choices": ["x", "y"], "label": true}', "must be an integer"),
    ('{"context": "c", "choices": ["x", "y"], "label": "1"}', "must be an integer"),
    ('{"context": null, "choices": ["x", "y"], "label": 0}', "must be a string"),  # was the text "None"
    ('{"context": "c", "choices": ["x", "x"], "label": 0}', "distinct and non-empty"),
    ('{"context": "c", "choices": ["x", " "], "label": 0}', "distinct and non-empty"),
    ('{"context": "c", "choices": ["x", "y"], "label": Infinity}', "must be an integer"),
    ('{"context": "c", "choices": ["x", "y"], "label": 1e999}', "must be an integer"),
    ('[1, 2]', "expected an object"),
])
def test_choice_records_of_the_wrong_types_are_refused_not_coerced(tmp_path: Path, record: str, message: str) -> None:
    """Silently coerced fields scored other tasks than the file meant: a choices string became
    its letters, a label of 1.7 became 1, a null context the text "None"."""
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(record + "\n")
    with pytest.raises(InputError, match=rf"bad.jsonl:1: .*{message}"):
        read_choice_jsonl(jsonl)


@pytest.mark.parametrize("label, endings", [("\u00b2", "a\nb\nc\nd"), ("0", "a\na\nc\nd"), ("0", "a\n\nc\nd")])
def test_hellaswag_labels_that_are_not_ascii_and_repeated_endings_are_refused(tmp_path: Path, label: str,
                                                                             endings: str) -> None:
    """A superscript two passed isdigit() and int() raised (a traceback); repeated or empty
    endings were scored as a tie broken by order."""
    bad = tmp_path / "bad.txt"
    bad.write_text(f"ctx\n{label}\n{endings}\n")
    with pytest.raises(InputError, match=r"bad.txt:[12]: "):
        read_hellaswag(bad)


def test_a_file_without_tasks_is_refused(tmp_path: Path) -> None:
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.jsonl"
    empty.write_text("")
    blank.write_text("\n\n")
    with pytest.raises(InputError, match=r"empty.txt: no tasks"):
        read_hellaswag(empty)
    with pytest.raises(InputError, match=r"blank.jsonl: no tasks"):
        read_choice_jsonl(blank)


def test_choices_that_share_no_first_token_are_refused() -> None:
    """Without BOS and context nothing predicts a choice's first token; forcing a one-token prefix
    scored "London is big" after "Paris" (the first choice's first word)."""
    vocabulary: dict[str, int] = {}

    def no_bos_tokenizer(text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [vocabulary.setdefault(word, len(vocabulary)) for word in text.split()]}

    with pytest.raises(InputError, match="share no first token"):
        encode_task(Task("", ("Paris is big", "London is big"), 0), no_bos_tokenizer)
    encoded = encode_task(Task("Cities:", ("Paris is big", "London is big"), 0), no_bos_tokenizer)
    assert encoded.prefix == (vocabulary["Cities:"],) and [len(s) for s in encoded.suffixes] == [3, 3]


TASKS = [Task("The cat sat on the", ("mat.", "big red chair near the window."), 0),
         Task("Rain fell all day, so we", ("stayed in.", "went out.", "slept"), 2),
         Task("A", ("b c d e f g", "b"), 1)]


def _separate_sequence_scores(model_dir: Path, tasks: list[Task]) -> list[float]:
    """Mean log-prob of each choice's own tokens, each choice run alone through transformers."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    for encoded in (encode_task(task, tokenizer) for task in tasks):
        for suffix in encoded.suffixes:
            ids = torch.tensor([list(encoded.prefix) + list(suffix)])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            first = len(encoded.prefix)
            expected.append(logprobs[first - 1 :].gather(-1, ids[0, first:, None]).mean().item())
    return expected


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_llama4_dir"])
def test_packed_scores_equal_each_choice_run_alone(model: str, request: pytest.FixtureRequest) -> None:
    """The packed rows (prefix once, choices masked from each other, positions restarted)
    give every choice the mean log-prob transformers computes for it as its own sequence,
    for a dense Llama and a Llama 4 MoE (experts streamed in chunks); padding rows included."""
    model_dir = request.getfixturevalue(model)
    tokenizer = load_tokenizer(model_dir)
    encoded = [encode_task(task, tokenizer) for task in TASKS]
    assert all(len(e.prefix) >= 1 and all(len(s) >= 1 for s in e.suffixes) for e in encoded)
    packed = pack_tasks(encoded, pad=0)
    assert packed.ids.shape == (3, max(e.packed_length for e in encoded))
    scores = streamed_choice_scores(lambda layout: StreamingModel(open_source(model_dir), batch=2, layout=layout), packed)
    torch.testing.assert_close(scores, torch.tensor(_separate_sequence_scores(model_dir, TASKS), dtype=torch.float64),
                               atol=1e-4, rtol=0)


class CountingSource:
    """A weight source that counts the reads of each layer and each chunk of experts."""

    def __init__(self, source):
        self.inner, self.table, self.config, self.reads = source, source.table, source.config, Counter()

    def layer_tensors(self, index: int, experts: bool = True):
        self.reads[("layer", index)] += 1
        return self.inner.layer_tensors(index, experts)

    def expert_tensors(self, index: int, first: int, count: int):
        self.reads[("experts", index, first)] += 1
        return self.inner.expert_tensors(index, first, count)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_blocks_stream_together_reading_each_layer_and_expert_chunk_once(tiny_llama4_dir: Path) -> None:
    """Several blocks of packed tasks go through each layer together: the same scores, bit for
    bit, as each block streamed alone, and every layer and chunk of experts read once."""
    from maverick_quant.validation.hellaswag import streamed_block_scores

    encoded = [encode_task(task, load_tokenizer(tiny_llama4_dir)) for task in TASKS]
    blocks = [pack_tasks(encoded[:1], pad=0), pack_tasks(encoded[1:], pad=0)]
    source = CountingSource(open_source(tiny_llama4_dir))
    model_for = lambda layout: StreamingModel(source, batch=2, layout=layout)  # noqa: E731
    together = streamed_block_scores(model_for, blocks)
    assert set(source.reads.values()) == {1} and ("experts", 1, 0) in source.reads
    for packed, scores in zip(blocks, together):
        assert torch.equal(scores, streamed_choice_scores(model_for, packed))
    assert set(source.reads.values()) == {3}  # alone: once more per block
    bounded = streamed_block_scores(model_for, blocks, pass_mib=1e-6)  # a budget below one block: a pass per block
    assert set(source.reads.values()) == {5}
    assert all(torch.equal(a, b) for a, b in zip(bounded, together))


def test_blocks_are_grouped_into_passes_under_the_memory_budget() -> None:
    from maverick_quant.validation.hellaswag import group_blocks

    mib = 2**20
    assert group_blocks([3 * mib, 3 * mib, 3 * mib, 10 * mib, 1 * mib], 6) == [[0, 1], [2], [3], [4]]
    assert group_blocks([3 * mib] * 3, None) == [[0, 1, 2]]
    assert group_blocks([3 * mib] * 3, 100) == [[0, 1, 2]]


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
                                      "--report", str(tmp_path / "r"), "--gate", "hellaswag.delta>=-1.0",
                                      "--gate", "multiple_choice.delta>=-1.0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"--hellaswag-tasks 6, but {tasks} holds 3 tasks: all 3 are scored" in result.output  # it was silent
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["hellaswag"]["tasks"] == 6 and report["hellaswag"]["delta"] == 0
    assert report["multiple_choice"]["tasks"] == 3
    tasks_read = read_hellaswag(hellaswag_file, 6)  # the accuracy, scored independently: each choice alone in transformers
    scores = torch.tensor(_separate_sequence_scores(tiny_llama_dir, tasks_read)).view(6, 4)
    right = scores.argmax(1) == torch.tensor([task.label for task in tasks_read])
    assert report["hellaswag"]["reference"]["acc"] == pytest.approx(100 * right.double().mean().item())


def test_a_nan_score_is_no_answer_and_a_reference_giving_one_is_refused(tiny_llama_dir: Path, monkeypatch) -> None:
    """argmax picked the NaN choice, so a broken candidate's NaN scores counted as answers (a
    quarter of them right by chance) and a broken reference set the accuracy it was judged by."""
    from maverick_quant.errors import ContentError
    from maverick_quant.validation import hellaswag
    from maverick_quant.validation.hellaswag import NO_ANSWER, evaluate_choices, predictions

    scores = torch.tensor([0.1, 0.9, 0.2, 0.3, float("nan"), 5.0, 0.0, 0.0, 1.0, float("inf")])
    assert predictions(scores, (4, 4, 2)).tolist() == [1, NO_ANSWER, NO_ANSWER]
    tasks = [Task("The cat sat on the", ("mat.", "moon.", "sea.", "sky."), 0)] * 2
    tokenizer = load_tokenizer(tiny_llama_dir)
    source = open_source(tiny_llama_dir)
    real = hellaswag.choose_answers
    broken = lambda *args, **kwargs: torch.full((len(args[1]),), NO_ANSWER)  # noqa: E731
    monkeypatch.setattr(hellaswag, "choose_answers", lambda src, *a, **k: (broken if src is source else real)(src, *a, **k))
    refusal = re.escape(f"{tiny_llama_dir}: the reference scored 2 multiple-choice tasks NaN/Inf")
    with pytest.raises(ContentError, match="^" + refusal):
        evaluate_choices(source, open_source(tiny_llama_dir), tasks, tokenizer, show_progress=False)
    drift = evaluate_choices(open_source(tiny_llama_dir), source, tasks, tokenizer, show_progress=False)
    assert drift["candidate"]["acc"] == 0  # a broken candidate answers nothing right


def test_validate_passes_its_choices_memory_budget_down(tiny_llama_dir: Path, hellaswag_file: Path,
                                                       small_text_file: Path, tmp_path: Path, monkeypatch) -> None:
    """`--choices-pass-mib` reaches the grouping of blocks into passes (for both models); 0 is refused."""
    from maverick_quant.validation import hellaswag

    budgets = []
    grouping = hellaswag.group_blocks
    monkeypatch.setattr(hellaswag, "group_blocks", lambda sizes, pass_mib: budgets.append(pass_mib) or grouping(sizes, pass_mib))
    common = ["validate", "--reference", str(tiny_llama_dir), "--candidate", str(tiny_llama_dir), "--data",
              str(small_text_file), "--ctx", "32", "--max-windows", "1", "--hellaswag", str(hellaswag_file),
              "--hellaswag-tasks", "2", "--no-progress"]
    result = CliRunner().invoke(cli, [*common, "--choices-pass-mib", "3", "--report", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "through the layers" not in result.output  # --no-progress silences the per-layer bar too
    assert budgets == [3, 3]
    result = CliRunner().invoke(cli, [*common, "--choices-pass-mib", "0", "--report", str(tmp_path / "r0")])
    assert result.exit_code == 2 and "--choices-pass-mib" in result.output


TABLE = torch.randn(50, 50, generator=torch.Generator().manual_seed(7))


class Causal:
    """A stand-in engine whose logits at a position depend on that position's token only."""

    def branch_logits(self, prefix: list[int], suffixes: list[list[int]]) -> list[torch.Tensor]:
        return [TABLE[torch.tensor([prefix[-1]] + suffix[:-1])] for suffix in suffixes]


def test_answers_come_back_in_task_order_whatever_the_blocks() -> None:
    """choose_answers sorts tasks by length into blocks; the answers return in task order."""
    from maverick_quant.validation.hellaswag import EncodedTask, choose_answers, predictions

    generator = torch.Generator().manual_seed(3)
    encoded = [EncodedTask(tuple(torch.randint(1, 50, (int(torch.randint(1, 6, (1,), generator=generator)),),
                                               generator=generator).tolist()),
                           tuple(tuple(torch.randint(1, 50, (1 + (task * choice) % 5,), generator=generator).tolist())
                                 for choice in range(4))) for task in range(11)]
    direct = predictions(branch_choice_scores(Causal(), encoded), (4,) * len(encoded))
    assert len(set(direct.tolist())) > 1
    for block in (1, 3, 64):
        assert choose_answers(Causal(), encoded, pad=0, block=block).tolist() == direct.tolist()


def test_branch_scoring_equals_the_packed_scoring() -> None:
    """branch_choice_scores (the GGUF path: prefix once, then each choice) gives the scores the
    packed streamed path computes, for a stand-in model whose logits at a position depend
    on that position's token only (so both paths must read the same predicting positions)."""
    from maverick_quant.validation.hellaswag import EncodedTask, mean_choice_logprobs

    encoded = [EncodedTask((1, 5), ((6, 7), (9, 9, 3))), EncodedTask((1,), ((8, 2),))]
    packed = pack_tasks(encoded, pad=0)
    logprobs = torch.log_softmax(TABLE[packed.ids].double(), -1)

    def logprob_of(first: int, last: int) -> torch.Tensor:
        rows, predictors = packed.row[first:last], packed.predictor[first:last]
        return logprobs[rows, predictors].gather(-1, packed.token[first:last, None]).squeeze(-1)

    torch.testing.assert_close(branch_choice_scores(Causal(), encoded), mean_choice_logprobs(packed, logprob_of))
    assert packed.layout.positions[0].tolist() == [0, 1, 2, 3, 2, 3, 4] and packed.choices_per_task == (2, 1)


def test_a_task_too_long_for_packed_rows_is_refused_before_the_evaluation(tiny_llama4_dir: Path, small_text_file: Path,
                                                                           tmp_path: Path) -> None:
    """The tiny Llama 4 attends in chunks of 16 tokens: a task whose context and choices pack into
    more cannot be scored as separate sequences in one row, and is refused up front, naming the
    file and the task (it used to fail inside the first layer with a ValueError)."""
    tasks = tmp_path / "long.jsonl"
    tasks.write_text(json.dumps({"context": "a short one", "choices": ["yes", "no"], "label": 0}) + "\n"
                     + json.dumps({"context": "the river runs past the old mill " * 3, "choices": ["and on", "or off"],
                                   "label": 1}) + "\n")
    result = CliRunner().invoke(cli, ["validate", "--reference", str(tiny_llama4_dir), "--candidate", str(tiny_llama4_dir),
                                      "--data", str(small_text_file), "--ctx", "16", "--max-windows", "1",
                                      "--choices", str(tasks), "--report", str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert f"{tasks} task 2: its context and 2 choices pack into" in result.output
    assert "this model computes packed rows of at most 16" in result.output and not (tmp_path / "r").exists()
