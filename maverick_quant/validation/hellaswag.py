"""Multiple-choice benchmark drift: HellaSwag (llama.cpp's text layout) and local JSONL.

Scoring follows llama.cpp's `hellaswag_score`: each choice is the sequence
BOS + context + " " + ending; the tokens shared by all choices of a task (their common
prefix) are context, and a choice's score is the MEAN log-probability of its remaining
tokens (length-normalised). The predicted choice is the argmax; accuracy is the share of
tasks whose prediction is the label.

As llama.cpp does, the shared prefix is computed once per task: a task is one row holding
the prefix and then every choice, each choice attending only to the prefix and to itself
(streaming.SequenceLayout), so the result equals scoring each choice as its own sequence.
Rows are right-padded; attention is causal, so padding never reaches a real position.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from maverick_quant.errors import ContentError, InputError
from maverick_quant.host_memory import release_free_memory
from maverick_quant.recipe import CHOICES_PASS_MIB
from maverick_quant.streaming import SequenceLayout, StreamingModel, WeightSource

HELLASWAG_LINES = 6  # per task: context, label, four endings
CHOICE_BLOCK = 64  # tasks packed together (sorted by length, padded to the block's longest row)


@dataclass(frozen=True)
class Task:
    context: str
    choices: tuple[str, ...]
    label: int


def read_hellaswag(path: Path, limit: int | None = None) -> list[Task]:
    """Tasks from llama.cpp's HellaSwag text file (6 lines per task); InputError naming the
    line on a malformed task."""
    from maverick_quant.calibration.records import text_lines

    lines = text_lines(path)
    if len(lines) % HELLASWAG_LINES:
        raise InputError(f"{path}: {len(lines)} lines is not a multiple of {HELLASWAG_LINES} (context, label, 4 endings)")
    tasks = []
    for start in range(0, len(lines), HELLASWAG_LINES):
        context, label, *endings = lines[start : start + HELLASWAG_LINES]
        if label.strip() not in {str(i) for i in range(len(endings))}:  # ASCII digits only: int() refuses others
            raise InputError(f"{path}:{start + 2}: label {label!r} is not an integer in [0, {len(endings) - 1}]")
        tasks.append(_checked(Task(context, tuple(endings), int(label)), f"{path}:{start + 1}"))
        if limit is not None and len(tasks) >= limit:
            break
    return _some(tasks, path)


def _some(tasks: list[Task], path: Path) -> list[Task]:
    """`tasks`, or InputError when the file held none (found before any work, not after hours)."""
    if not tasks:
        raise InputError(f"{path}: no tasks in the file")
    return tasks


def _checked(task: Task, where: str) -> Task:
    """`task`, or InputError naming `where` when two choices are equal or one is empty: the
    score of a tie would depend on how it is broken."""
    if any(not choice.strip() for choice in task.choices) or len(set(task.choices)) < len(task.choices):
        raise InputError(f"{where}: the choices must be distinct and non-empty, got {list(task.choices)!r}")
    return task


def _choice_task(record, where: str) -> Task:
    """A task from one JSONL record {"context": str, "choices": [str, ...], "label": int}, its
    types checked (a string of choices was split into letters, a label of 1.7 cut to 1)."""
    if not isinstance(record, dict) or not {"context", "choices", "label"} <= set(record):
        raise InputError(f"{where}: expected an object with \"context\", \"choices\" and \"label\"")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        raise InputError(f"{where}: \"context\" must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise InputError(f"{where}: \"choices\" must be a list of two or more strings, got {choices!r}")
    if type(label) is not int or not 0 <= label < len(choices):
        raise InputError(f"{where}: \"label\" must be an integer in [0, {len(choices) - 1}], got {label!r}")
    return _checked(Task(context, tuple(choices), label), where)


def read_choice_jsonl(path: Path, limit: int | None = None) -> list[Task]:
    """Tasks from JSONL records {"context": str, "choices": [str, ...], "label": int}."""
    from maverick_quant.calibration.records import text_lines

    tasks = []
    for number, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:  # JSONDecodeError is one
            raise InputError(f"{path}:{number}: not JSON ({exc})") from None
        tasks.append(_choice_task(record, f"{path}:{number}"))
        if limit is not None and len(tasks) >= limit:
            break
    return _some(tasks, path)


@dataclass(frozen=True)
class EncodedTask:
    """A task's token ids: `prefix`, the tokens every choice shares (BOS + context; at least
    BOS), and each choice's own tokens `suffixes` (at least one each), the scored ones."""

    prefix: tuple[int, ...]
    suffixes: tuple[tuple[int, ...], ...]

    @property
    def packed_length(self) -> int:
        return len(self.prefix) + sum(map(len, self.suffixes))


def check_packed_rows(encoded: list[EncodedTask], source, where: str = "multiple-choice") -> None:
    """InputError naming the first task whose packed row (prefix + every choice) a streamed
    model cannot compute as separate sequences: rows must be shorter than every layer's
    attention window (chunked attention) and than the NoPE temperature tuning's floor_scale
    (`SequenceLayout.packed_row_limit`)."""
    from maverick_quant.streaming import SequenceLayout

    text = source.table.text_config(source.config)
    windows = [source.table.plan(text, index).attention_window for index in range(text.num_hidden_layers)]
    limits = [w for w in windows if w] + [SequenceLayout.packed_row_limit(text) or math.inf]
    limit = min(limits)
    for number, task in enumerate(encoded, start=1):
        if task.packed_length > limit:
            raise InputError(f"{where} task {number}: its context and {len(task.suffixes)} choices pack into "
                             f"{task.packed_length} tokens; this model computes packed rows of at most {limit} "
                             "(attention window, NoPE temperature tuning): shorten its context or choices")


def encode_task(task: Task, tokenizer) -> EncodedTask:
    """BOS + context + " " + ending per choice, split at the choices' common prefix (llama.cpp
    scores the tokens after it; the prefix keeps >= 1 token and leaves each choice >= 1)."""
    encoded = [tokenizer(f"{task.context} {choice}", add_special_tokens=True)["input_ids"] for choice in task.choices]
    common = _common_prefix(encoded)
    if common == 0:
        raise InputError(f"a task with context {task.context[:60]!r}: its choices share no first token (no BOS and "
                         "no common context), so nothing predicts their first tokens; give every task a context")
    shared = min(common, min(map(len, encoded)) - 1)
    return EncodedTask(tuple(encoded[0][:shared]), tuple(tuple(ids[shared:]) for ids in encoded))


def _common_prefix(sequences: list[list[int]]) -> int:
    length = 0
    for column in zip(*sequences):
        if len(set(column)) != 1:
            break
        length += 1
    return length


@dataclass(frozen=True)
class PackedTasks:
    """Tasks packed one per row: the shared prefix once, then every choice's tokens, each
    choice attending only to the prefix and itself (`layout`), so every choice is computed
    exactly as its own sequence prefix + choice, with the prefix computed once per task.

    ids [T, L] (right-padded), layout (positions and segments [T, L]); for the N scored
    tokens of all choices: row, predictor (the position whose logits predict it), token and
    choice (its index among all choices of the block, task by task) [N]; choices per task."""

    ids: torch.Tensor
    layout: SequenceLayout
    row: torch.Tensor
    predictor: torch.Tensor
    token: torch.Tensor
    choice: torch.Tensor
    choices_per_task: tuple[int, ...]


def pack_tasks(encoded: list[EncodedTask], pad: int) -> PackedTasks:
    """Rows for `encoded` (see PackedTasks); `pad` fills the tail of shorter rows."""
    length = max(task.packed_length for task in encoded)
    ids = torch.full((len(encoded), length), pad)
    positions = torch.zeros(len(encoded), length, dtype=torch.long)
    segments = torch.full((len(encoded), length), -1)
    scored = {"row": [], "predictor": [], "token": [], "choice": []}
    choice = 0
    for row, task in enumerate(encoded):
        shared = len(task.prefix)
        ids[row, :shared], positions[row, :shared], segments[row, :shared] = torch.tensor(task.prefix), torch.arange(shared), 0
        offset = shared
        for number, suffix in enumerate(task.suffixes, 1):
            span = slice(offset, offset + len(suffix))
            ids[row, span], segments[row, span] = torch.tensor(suffix), number
            positions[row, span] = torch.arange(shared, shared + len(suffix))
            predictors = [shared - 1] + list(range(offset, offset + len(suffix) - 1))
            scored["row"] += [row] * len(suffix)
            scored["predictor"] += predictors
            scored["token"] += suffix
            scored["choice"] += [choice] * len(suffix)
            offset, choice = offset + len(suffix), choice + 1
    return PackedTasks(ids, SequenceLayout(positions, segments), *(torch.tensor(v) for v in scored.values()),
                       tuple(len(task.suffixes) for task in encoded))


def mean_choice_logprobs(packed: PackedTasks, logprob_of) -> torch.Tensor:
    """Mean log-probability of each choice's tokens [choices], from `logprob_of(first, last)`,
    the log-probs [last - first] of scored tokens first..last-1 (in PackedTasks order)."""
    sums = torch.zeros(sum(packed.choices_per_task), dtype=torch.float64)
    step = 1024  # scored tokens per lm_head call: [step, V] logits stay ~ 200 MB in float64
    for first in range(0, packed.choice.numel(), step):
        last = min(first + step, packed.choice.numel())
        sums.index_add_(0, packed.choice[first:last], logprob_of(first, last))
        release_free_memory()  # [step, V] float64 temporaries (host_memory.py)
    return sums / torch.bincount(packed.choice, minlength=sums.numel())


@torch.no_grad()
def streamed_choice_scores(model_for, packed: PackedTasks) -> torch.Tensor:
    """Scores [choices] of `packed` from a StreamingModel built by `model_for(layout)`: every
    row through every layer (MoE experts streamed as in validation), then the final norm and
    lm_head only at the predicting positions."""
    return streamed_block_scores(model_for, [packed])[0]


@torch.no_grad()
def streamed_block_scores(model_for, blocks: list[PackedTasks], progress: bool = False,
                          pass_mib: float | None = None) -> list[torch.Tensor]:
    """`streamed_choice_scores` of several blocks, layer by layer over as many of them at once
    as `pass_mib` of hidden states allows (all when None): each layer (and each chunk of an MoE
    layer's experts) is read once per pass, not once per block, which is what a model far
    larger than memory pays for. Host memory: one pass's hidden states [T_b, L_b, D] (fp32).
    With `progress`, a bar counts the layers of each pass."""
    model = model_for(blocks[0].layout)
    first = model.embed(blocks[0].ids[:1, :1])  # one token's hidden state [1, 1, D]: its bytes size the blocks
    token_bytes = first.element_size() * first.shape[-1]
    passes = group_blocks([packed.ids.numel() * token_bytes for packed in blocks], pass_mib)
    scores = []
    for number, group in enumerate(passes, 1):
        scores += _pass_scores(model, [blocks[i] for i in group], progress, f"pass {number}/{len(passes)}")
    return scores


def group_blocks(sizes: list[int], pass_mib: float | None) -> list[list[int]]:
    """Consecutive blocks grouped into passes of at most `pass_mib` MiB each (`sizes` in
    bytes; a block larger than the budget gets a pass of its own); one pass when None."""
    if pass_mib is None:
        return [list(range(len(sizes)))]
    budget, passes, used = pass_mib * 2**20, [[]], 0
    for index, size in enumerate(sizes):
        if passes[-1] and used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(index)
        used += size
    return passes


def _pass_scores(model, blocks: list[PackedTasks], progress: bool, label: str) -> list[torch.Tensor]:
    """Scores of `blocks` streamed together through every layer of `model` (one pass)."""
    from maverick_quant.validation.evaluate import forward_layer_blocks

    caches = [(packed.layout, model.embed(packed.ids)) for packed in blocks]
    tasks = sum(len(packed.choices_per_task) for packed in blocks)
    for index in tqdm(range(model.num_layers), desc=f"{tasks} tasks through the layers ({label})", unit="layer",
                      disable=not progress, leave=False):
        forward_layer_blocks(model, index, caches)
        release_free_memory()
    return [_packed_scores(model, packed, hidden) for packed, (_, hidden) in zip(blocks, caches)]


def _packed_scores(model, packed: PackedTasks, hidden: torch.Tensor) -> torch.Tensor:
    """Scores [choices] of `packed` from its last hidden states [T, L, D] (final norm and
    lm_head only at the predicting positions)."""
    predicting = hidden[packed.row, packed.predictor]

    def logprob_of(first: int, last: int) -> torch.Tensor:
        logprobs = torch.log_softmax(model.logits(predicting[first:last]).double(), -1)
        return logprobs.gather(-1, packed.token[first:last, None]).squeeze(-1)

    return mean_choice_logprobs(packed, logprob_of)


def branch_choice_scores(candidate, encoded: list[EncodedTask]) -> torch.Tensor:
    """Scores [choices] from an engine that evaluates a prefix once and then each branch
    (`candidate.branch_logits(prefix, suffixes)` -> per suffix [len, V] logits predicting its
    tokens; a GGUF run in llama.cpp keeps the prefix in its KV cache)."""
    scores = []
    for task in encoded:
        for suffix, logits in zip(task.suffixes, candidate.branch_logits(list(task.prefix), [list(s) for s in task.suffixes])):
            logprobs = torch.log_softmax(logits.double(), -1)
            scores.append(logprobs.gather(-1, torch.tensor(suffix)[:, None]).mean())
    return torch.stack(scores)


NO_ANSWER = -1  # a task whose scores are not all finite: never counted right


def predictions(scores: torch.Tensor, choices_per_task: tuple[int, ...]) -> torch.Tensor:
    """The argmax choice of each task [tasks] from the scores of all choices [choices];
    NO_ANSWER for a task with a NaN or infinite score (argmax would pick the NaN: a broken
    model's answers were counted as its choices)."""
    return torch.stack([part.argmax() if torch.isfinite(part).all() else torch.tensor(NO_ANSWER)
                        for part in scores.split(list(choices_per_task))])


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


def choose_answers(source, encoded: list[EncodedTask], pad: int, block: int = CHOICE_BLOCK, kernels: str | None = None,
                   bar=None, device: torch.device | str = "cpu", pass_mib: float | None = CHOICES_PASS_MIB) -> torch.Tensor:
    """The choice `source` picks for each task [tasks]. Tasks are sorted by packed length and
    packed `block` at a time (little padding); the blocks then go through the layers together,
    on `device`, as many per pass as `pass_mib` of hidden states allows, so the weights are
    read once per pass (`streamed_block_scores`). A source
    with `branch_logits` (a GGUF) is run task by task; with `kernels` (a backend name) a bundle
    runs its 4-bit weights there."""
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].packed_length)
    chosen = torch.empty(len(encoded), dtype=torch.long)
    members = [order[start : start + block] for start in range(0, len(order), block)]
    blocks = [pack_tasks([encoded[i] for i in part], pad) for part in members]
    shown = bar is not None and not getattr(bar, "disable", False)  # --no-progress hands in a disabled bar
    scored = _block_scores(source, encoded, members, blocks, kernels, device, shown, pass_mib)
    for part, packed, scores in zip(members, blocks, scored):
        chosen[part] = predictions(scores, packed.choices_per_task)
        if bar is not None:
            bar.update(len(part))
    return chosen


def _block_scores(source, encoded: list[EncodedTask], members: list[list[int]], blocks: list[PackedTasks],
                  kernels: str | None, device: torch.device | str, progress: bool, pass_mib: float | None):
    """Scores [choices] of each block: task by task for an engine with `branch_logits` (yielded
    as they come), else the blocks streamed together through the layers, `pass_mib` of hidden
    states per pass (a bar per layer)."""
    if hasattr(source, "branch_logits"):
        return (branch_choice_scores(source, [encoded[i] for i in part]) for part in members)
    if kernels is not None:
        from maverick_quant.runtime import KernelModel

        model_for = lambda layout: KernelModel(source, kernels, layout=layout, device=device)  # noqa: E731
    else:
        model_for = lambda layout: StreamingModel(source, layout=layout, device=device)  # noqa: E731
    return streamed_block_scores(model_for, blocks, progress, pass_mib)


def evaluate_choices(reference: WeightSource, candidate, tasks: list[Task], tokenizer, block: int = CHOICE_BLOCK,
                     kernels: str | None = None, show_progress: bool = True, device: torch.device | str = "cpu",
                     pass_mib: float | None = CHOICES_PASS_MIB) -> dict:
    """Accuracy of both models on `tasks` and the drift (see `choose_answers`; `kernels`
    applies to the candidate only), layers computed on `device`, `pass_mib` of hidden states
    per pass over the weights."""
    encoded = [encode_task(task, tokenizer) for task in tasks]
    labels, pad = torch.tensor([task.label for task in tasks]), tokenizer.eos_token_id or 0
    with tqdm(total=2 * len(tasks), desc="multiple choice (both models)", unit="task", disable=not show_progress) as bar:
        reference_choice = choose_answers(reference, encoded, pad, block, bar=bar, device=device, pass_mib=pass_mib)
        if (reference_choice == NO_ANSWER).any():  # a candidate can break, the reference it is judged against cannot
            from maverick_quant.validation.evaluate import reference_folder

            raise ContentError(f"{reference_folder(reference)}: the reference scored "
                               f"{int((reference_choice == NO_ANSWER).sum())} multiple-choice tasks NaN/Inf: its "
                               "activations overflow; check its weights")
        reference_right = reference_choice == labels
        candidate_right = choose_answers(candidate, encoded, pad, block, kernels, bar=bar, device=device,
                                         pass_mib=pass_mib) == labels
    return accuracy_drift(reference_right, candidate_right)
