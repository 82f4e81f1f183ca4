"""Multiple-choice benchmark drift: HellaSwag (llama.cpp's text layout) and local JSONL.

Scoring follows llama.cpp's `hellaswag_score`: each choice is the sequence
BOS + context + " " + ending; the tokens shared by all choices of a task (their common
prefix) are context, and a choice's score is the MEAN log-probability of its remaining
tokens (length-normalised). The predicted choice is the argmax; accuracy is the share of
tasks whose prediction is the label.

Sequences of a block of tasks are right-padded to one length: attention is causal, so the
padding never changes the logits of real positions, which are the only ones read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from maverick_quant.errors import InputError
from maverick_quant.streaming import StreamingModel, WeightSource

HELLASWAG_LINES = 6  # per task: context, label, four endings


@dataclass(frozen=True)
class Task:
    context: str
    choices: tuple[str, ...]
    label: int


def read_hellaswag(path: Path, limit: int | None = None) -> list[Task]:
    """Tasks from llama.cpp's HellaSwag text file (6 lines per task); InputError naming the
    line on a malformed task."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if len(lines) % HELLASWAG_LINES:
        raise InputError(f"{path}: {len(lines)} lines is not a multiple of {HELLASWAG_LINES} (context, label, 4 endings)")
    tasks = []
    for start in range(0, len(lines), HELLASWAG_LINES):
        context, label, *endings = lines[start : start + HELLASWAG_LINES]
        if not label.strip().isdigit() or not 0 <= int(label) < len(endings):
            raise InputError(f"{path}:{start + 2}: label {label!r} is not an integer in [0, {len(endings) - 1}]")
        tasks.append(Task(context, tuple(endings), int(label)))
        if limit is not None and len(tasks) >= limit:
            break
    return tasks


def read_choice_jsonl(path: Path, limit: int | None = None) -> list[Task]:
    """Tasks from JSONL records {"context": str, "choices": [str, ...], "label": int}."""
    tasks = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            task = Task(str(record["context"]), tuple(map(str, record["choices"])), int(record["label"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}:{number}: expected {{\"context\", \"choices\", \"label\"}} ({exc})") from None
        if len(task.choices) < 2 or not 0 <= task.label < len(task.choices):
            raise InputError(f"{path}:{number}: need >= 2 choices and a label indexing them")
        tasks.append(task)
        if limit is not None and len(tasks) >= limit:
            break
    return tasks


@dataclass(frozen=True)
class ChoiceBatch:
    """Token ids [C, L] of every choice of a block of tasks (right-padded), the first scored
    position and length of each [C], and the task of each choice [C]."""

    ids: torch.Tensor
    first: torch.Tensor
    length: torch.Tensor
    task: torch.Tensor


def encode_tasks(tasks: list[Task], tokenizer) -> ChoiceBatch:
    """BOS + context + " " + ending per choice; scoring starts after the choices' common prefix."""
    sequences, firsts, owners = [], [], []
    for index, task in enumerate(tasks):
        encoded = [tokenizer(f"{task.context} {choice}", add_special_tokens=True)["input_ids"] for choice in task.choices]
        prefix = _common_prefix(encoded)
        for ids in encoded:
            sequences.append(ids)
            firsts.append(min(max(prefix, 1), len(ids) - 1))
            owners.append(index)
    longest = max(map(len, sequences))
    pad = tokenizer.eos_token_id or 0
    ids = torch.tensor([s + [pad] * (longest - len(s)) for s in sequences])
    return ChoiceBatch(ids, torch.tensor(firsts), torch.tensor([len(s) for s in sequences]), torch.tensor(owners))


def _common_prefix(sequences: list[list[int]]) -> int:
    length = 0
    for column in zip(*sequences):
        if len(set(column)) != 1:
            break
        length += 1
    return length


def choice_scores(logprobs: torch.Tensor, batch: ChoiceBatch) -> torch.Tensor:
    """Mean log-probability of each choice's scored tokens [C] from next-token log-probs
    [C, L-1, V] (position j predicts token j+1)."""
    positions = torch.arange(batch.ids.shape[1] - 1)[None]
    scored = (positions >= batch.first[:, None] - 1) & (positions < batch.length[:, None] - 1)
    token_logprobs = logprobs.gather(-1, batch.ids[:, 1:, None]).squeeze(-1)
    return (token_logprobs * scored).sum(1) / scored.sum(1)


@torch.no_grad()
def model_choice_scores(source: WeightSource, batch: ChoiceBatch, windows: int = 8) -> torch.Tensor:
    """Stream `source` over every choice sequence; their scores [C]."""
    model = StreamingModel(source, batch=windows)
    hidden = model.embed(batch.ids)
    for index in range(model.num_layers):
        model.run_layer(model.layer(index), hidden, out=hidden)
    scores = []
    for start in range(0, hidden.shape[0], windows):
        part = slice(start, start + windows)
        logprobs = torch.log_softmax(model.logits(hidden[part, :-1]).double(), -1)
        sub = ChoiceBatch(batch.ids[part], batch.first[part], batch.length[part], batch.task[part])
        scores.append(choice_scores(logprobs, sub))
    return torch.cat(scores)


def window_choice_scores(candidate, batch: ChoiceBatch) -> torch.Tensor:
    """Scores [C] from a model that returns one sequence's logits at a time
    (`candidate.window_logits(ids) -> [L, V]`, e.g. a GGUF run in llama.cpp)."""
    scores = []
    for row in range(batch.ids.shape[0]):
        first, length = int(batch.first[row]), int(batch.length[row])
        logprobs = torch.log_softmax(candidate.window_logits(batch.ids[row, :length].tolist())[:-1].double(), -1)
        tokens = batch.ids[row, first:length]
        scores.append(logprobs[first - 1 : length - 1].gather(-1, tokens[:, None]).mean())
    return torch.stack(scores)


def predictions(scores: torch.Tensor, batch: ChoiceBatch, tasks: int) -> torch.Tensor:
    """The argmax choice (index within its task) of each task [tasks]."""
    best = torch.full((tasks,), -1)
    best_score = torch.full((tasks,), -math.inf, dtype=scores.dtype)
    offsets = torch.zeros(tasks, dtype=torch.long)
    for row in range(scores.shape[0]):
        task = int(batch.task[row])
        if scores[row] > best_score[task]:
            best_score[task], best[task] = scores[row], offsets[task]
        offsets[task] += 1
    return best


def accuracy_drift(correct_ref: torch.Tensor, correct_cand: torch.Tensor) -> dict:
    """Accuracies (%) of both, their difference, and 95% intervals: each accuracy's binomial
    (normal) interval and the paired difference's, var = (b + c)/n^2 - (b - c)^2/n^3 with b, c
    the tasks only one of them got right."""
    n = correct_ref.numel()
    ref, cand = correct_ref.double().mean().item(), correct_cand.double().mean().item()
    b = int((correct_ref & ~correct_cand).sum())
    c = int((~correct_ref & correct_cand).sum())
    diff_sd = math.sqrt(max((b + c) / n**2 - (b - c) ** 2 / n**3, 0.0))
    half = lambda p: 1.96 * math.sqrt(p * (1 - p) / n)  # noqa: E731
    return {"tasks": n, "reference": {"acc": 100 * ref, "ci95": 100 * half(ref)},
            "candidate": {"acc": 100 * cand, "ci95": 100 * half(cand)},
            "delta": 100 * (cand - ref), "delta_ci95": 100 * 1.96 * diff_sd, "only_reference_right": b,
            "only_candidate_right": c}


def evaluate_choices(reference: WeightSource, candidate: WeightSource, tasks: list[Task], tokenizer,
                     block: int = 256) -> dict:
    """Accuracy of both models on `tasks` (blocks of `block` tasks at a time) and the drift; a
    model with `window_logits` (a GGUF candidate) is run one sequence at a time."""
    correct = {"reference": [], "candidate": []}
    for start in range(0, len(tasks), block):
        chunk = tasks[start : start + block]
        batch = encode_tasks(chunk, tokenizer)
        labels = torch.tensor([task.label for task in chunk])
        for name, source in (("reference", reference), ("candidate", candidate)):
            score = window_choice_scores if hasattr(source, "window_logits") else model_choice_scores
            correct[name].append(predictions(score(source, batch), batch, len(chunk)) == labels)
    return accuracy_drift(torch.cat(correct["reference"]), torch.cat(correct["candidate"]))
