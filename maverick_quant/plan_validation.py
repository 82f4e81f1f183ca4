"""What a `validate` run will hold in memory, read, write and take: the validation part of `plan`.

Notation: W windows of L tokens (T = W L), hidden D, vocabulary V, E routed experts of width I
(top-k routing), validate's batch b windows; both models run in fp32 (4 bytes per value); P_l:
layer l's tensors without its routed experts; s: the reference checkpoint's bytes per weight;
n_c: experts per chunk (`experts.experts_per_chunk` at validate's chunk budget); n_hot: the
busiest expert's tokens (T k / E when routing is even, else from `plan --coverage`).

The phases of a run (validation/evaluate.py, validation/hellaswag.py) and the memory each holds
beside the baseline, in bytes:

    layers   host    caches        2 T D 4       both models' hidden states
                     moe_input     T D 4         (MoE layer) the reference's block input, kept while
                                                 the candidate layer runs on it
             device  layers        2 P_l 4       both models' layer l
                     activations   b L (2 max(3 D, 2 I_l) + 3 D) 4   (dense layer) one batch's
                                                 intermediates, twice, and its three outputs
                     block_io      4 T D 4       (MoE layer) input and output of the candidate's two
                                                 caches run together (the reference's step holds three)
                     routing       2 T E 4       (MoE layer) router logits of two caches
                     expert_chunks n_c 3 D I (4 + 5)     (MoE layer) a chunk of the reference's
                                                 experts in fp32 while the candidate's is read:
                                                 its fused fp32 tensors, filled one expert at a
                                                 time, and the unpacked codes of one linear (at
                                                 most 1 byte a weight)
                     expert_work   n_hot (5 D + 3 I) 4   (MoE layer) the busiest expert's inputs of
                                                 both models, its intermediates and both outputs
             host    expert_reads  n_c 3 D I (s + c)   (MoE layer, GPU runs) a chunk of the
                                                 reference as stored and of the candidate as
                                                 stored (c bytes per weight; a bundle's packed
                                                 codes are unpacked on the device)
    score    host    caches
             device  final         2 V D 4       both lm_heads in fp32
                     logits        2 max(1, b // 2) L V 4
                     metric_work   13 C          the metrics' workspace over C logits at a time
                                                 (validation/metrics.py)
    choices  (each model alone, one pass of T_p tokens: blocks of 64 tasks padded to their longest
             row, grouped up to `choices_pass_mib` of hidden states)
             host    pass_hidden   T_p D 4
             device  layers        P_l 4,  block_io 2 T_p D 4,  routing T_p E 4, activations of a
                     batch of 8 packed rows (dense layers), expert_chunks n_c 3 D I max(4 + s, 13),
                     final V D 4,  choice_logits 1024 V (4 + 8 + 8)

On the CPU every term is host memory. peak host = baseline + the largest phase's host terms;
peak device = the largest phase's device terms (the CUDA context, ~0.5 GiB, on top).

Time = flops / the device's fp32 matmul rate + bytes read / read rate + bytes written / write rate
+ on the CPU, the candidate's weights dequantized x measured seconds per weight (a GPU run
dequantizes on the GPU: elementwise work beside the matmuls, not counted), where

    flops    T sum_l (3 F_l + R_l) + 2 * 2 T D V             (windows: the reference once, the
             candidate on the reference's input and on its own, its routed experts once more to
             measure each one; both lm_heads), F_l = 2 a_l + 4 L A (a_l: layer l's weights
             active per token, A = heads x head_dim), R_l = 2 k 3 D I in an MoE layer;
             + per model T_c sum_l F_l + 2 S_c D V          (choices: T_c tokens, S_c scored)
    reads    the reference once, the candidate once with its routed experts twice (windows);
             each model once per choices pass
    writes   both caches after every layer (2 T D 4 each time, for `validate --resume`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from maverick_quant.plan_passes import attention_flops
from maverick_quant.validation.hellaswag import CHOICE_BLOCK, group_blocks
from maverick_quant.validation.metrics import DEFAULT_CHUNK_ELEMENTS

FP32 = 4
CANDIDATE_CHUNK_BYTES = 1 + FP32  # per weight of a candidate's expert chunk while it is read (codes, the fused fp32 tensors)
CHOICE_BATCH = 8  # packed rows per forward in the choices benchmarks (StreamingModel's default batch)
METRIC_WORKSPACE = 3 * FP32 + 1  # bytes per logit of metrics.Workspace (three fp32 buffers and a mask)
CHOICE_LOGIT_ROWS = 1024  # scored tokens per lm_head call in the choices benchmarks (hellaswag.py)
HELLASWAG_PADDED_TOKENS_PER_TASK = 168.0
"""Tokens per HellaSwag task after packing and padding to the block's longest row, over the whole
validation split with SmolLM2's tokenizer (89.6 over its first 1,000 tasks); used when `plan`
cannot tokenize the tasks itself."""
HELLASWAG_SCORED_TOKENS_PER_TASK = 117.2  # the endings' tokens, same measurement (55.8 over the first 1,000)


@dataclass(frozen=True)
class ChoiceTokens:
    """The multiple-choice benchmarks' tokens: padded tokens of each block of tasks (in the
    order they run), scored tokens in all, and the mean packed row length (attention span)."""

    blocks: tuple[int, ...]
    scored: int
    row_length: float
    measured: bool

    @classmethod
    def assumed(cls, tasks: int) -> "ChoiceTokens":
        """`tasks` HellaSwag tasks at the measured averages (blocks of CHOICE_BLOCK tasks)."""
        sizes = [min(CHOICE_BLOCK, tasks - first) for first in range(0, tasks, CHOICE_BLOCK)]
        return cls(tuple(round(n * HELLASWAG_PADDED_TOKENS_PER_TASK) for n in sizes),
                   round(tasks * HELLASWAG_SCORED_TOKENS_PER_TASK), HELLASWAG_PADDED_TOKENS_PER_TASK, False)

    @classmethod
    def of(cls, encoded: list) -> "ChoiceTokens":
        """Measured from encoded tasks (hellaswag.EncodedTask), blocked as `choose_answers` blocks them."""
        lengths = sorted(task.packed_length for task in encoded)
        blocks = tuple(max(lengths[i : i + CHOICE_BLOCK]) * len(lengths[i : i + CHOICE_BLOCK])
                       for i in range(0, len(lengths), CHOICE_BLOCK))
        scored = sum(len(suffix) for task in encoded for suffix in task.suffixes)
        return cls(blocks, scored, sum(blocks) / max(len(lengths), 1), True)


@dataclass(frozen=True)
class ValidationSettings:
    """What `validate` is asked to do: W `windows` of `ctx` tokens, `batch` windows per forward,
    routed experts read `chunk_mib` at a time, `choices` (None: no multiple-choice benchmark)
    grouped into passes of `pass_mib` of hidden states."""

    windows: int
    ctx: int
    batch: int = 4
    chunk_mib: int = 8192
    choices: ChoiceTokens | None = None
    pass_mib: int = 8192


@dataclass
class Phase:
    """One phase of a run: its memory terms {name: bytes} in host memory and on the device."""

    name: str
    host: dict[str, int]
    device: dict[str, int]


@dataclass
class ValidationPlan:
    """The plan of one validation on `device` ("cpu" or "cuda"): the memory of every phase, the
    floating-point work, bytes read and written, weights dequantized, the largest resume state
    on disk, the multiple-choice passes over the weights, and (where timed) seconds by part."""

    settings: ValidationSettings
    phases: list[Phase]
    flops: float
    read_bytes: int
    write_bytes: int
    dequantized_weights: int
    resume_bytes: int  # the kept caches on disk, twice while the next are written
    choice_passes: int
    device: str = "cpu"
    seconds: dict[str, float] | None = None  # {"compute", "read", "write"[, "dequantize"]}; None: not timed

    def peak(self, where: str) -> Phase:
        """The phase holding the most memory `where` ("host" or "device")."""
        return max(self.phases, key=lambda phase: sum(getattr(phase, where).values()))

    def to_dict(self, baseline: int) -> dict:
        """The plan as JSON (`plan --json`'s "validation"); `baseline`: the process's own bytes."""
        host, device = self.peak("host"), self.peak("device") if self.device != "cpu" else None
        return {"windows": self.settings.windows, "ctx": self.settings.ctx, "batch": self.settings.batch,
                "choice_tokens": sum(self.settings.choices.blocks) if self.settings.choices else 0,
                "choice_passes": self.choice_passes,
                "peak_host_bytes": baseline + sum(host.host.values()), "peak_host_phase": {"phase": host.name, **host.host},
                "gpu_bytes": None if device is None else sum(device.device.values()),
                "peak_gpu_phase": None if device is None else {"phase": device.name, **device.device},
                "flops": self.flops, "read_bytes": self.read_bytes, "write_bytes": self.write_bytes,
                "dequantized_weights": self.dequantized_weights, "disk_bytes": self.resume_bytes,
                "seconds": None if self.seconds is None else sum(self.seconds.values()), "seconds_by_part": self.seconds}


def _layer_params(plan, moe_names: set) -> int:
    """Values in layer `plan`'s tensors but the routed experts (`moe_names`)."""
    return sum(math.prod(shape) for name, shape in plan.shapes.items() if name not in moe_names)


def _expert_weights(plan) -> int:
    """Weights of one routed expert of MoE layer `plan` (its slice of each fused tensor)."""
    return sum(math.prod(plan.shapes[name][1:]) for name in plan.moe.fused_names)


def _active_weights(plan, moe_names: set) -> int:
    """Weights one token goes through in layer `plan`: every matrix but the routed experts and,
    for an MoE layer, its top-k experts (norms and other vectors left out)."""
    dense = sum(math.prod(shape) for name, shape in plan.shapes.items() if len(shape) == 2 and name not in moe_names)
    return dense if plan.moe is None else dense + plan.moe.top_k * _expert_weights(plan)


def _moe_terms(text, plan, tokens: int, caches: int, chunk: int, stored_bytes: float, hot_tokens: float,
               models: int) -> dict[str, int]:
    """Device terms of an MoE layer run on `caches` caches of `tokens` tokens each, a chunk of
    `chunk` experts of each of `models` models (1: whichever of the two needs more; see the
    module docstring); `stored_bytes`: the reference's bytes per weight."""
    hidden, inter = text.hidden_size, text.intermediate_size
    per_weight = FP32 + CANDIDATE_CHUNK_BYTES if models == 2 else max(FP32 + stored_bytes, CANDIDATE_CHUNK_BYTES)
    terms = {"block_io": 2 * caches * tokens * hidden * FP32, "routing": caches * tokens * plan.moe.num_experts * FP32,
             "expert_chunks": int(chunk * 3 * hidden * inter * per_weight)}
    if models == 2:
        terms["expert_work"] = int(hot_tokens * (5 * hidden + 3 * inter) * FP32)
    return terms


def _phases(table, text, settings: ValidationSettings, stored_bytes: float, candidate_bytes: float, shares: dict,
            pass_tokens: int, gpu: bool) -> list[Phase]:
    """The memory of every phase (one per layer of the windows pass, the scoring, and the
    choices pass of `pass_tokens` tokens) as terms on the host and on the device (`gpu`: a
    GPU run, which reads expert chunks on the host first); `stored_bytes`, `candidate_bytes`:
    each model's stored bytes per weight."""
    from maverick_quant.experts import experts_per_chunk

    hidden, vocab = text.hidden_size, text.vocab_size
    tokens = settings.windows * settings.ctx
    caches = {"caches": 2 * tokens * hidden * FP32}
    phases, choice_layers = [], []
    for index in range(text.num_hidden_layers):
        plan = table.plan(text, index)
        moe_names = set(plan.moe.fused_names) if plan.moe else set()
        layer = _layer_params(plan, moe_names) * FP32
        if plan.moe is None:
            widest = max((shape[0] for name, shape in plan.shapes.items() if len(shape) == 2), default=hidden)
            per_row = (2 * max(3 * hidden, 2 * widest) + 3 * hidden) * FP32
            phases.append(Phase(f"layer {index}", dict(caches),
                                {"layers": 2 * layer, "activations": settings.batch * settings.ctx * per_row}))
            row = settings.choices.row_length if settings.choices else 0
            choice_layers.append({"layers": layer, "activations": int(CHOICE_BATCH * row * per_row)})
            continue
        chunk = experts_per_chunk(plan.moe, hidden, text.intermediate_size, settings.chunk_mib)
        counts = [tokens * plan.moe.top_k * share for share in shares.get(index) or [1 / plan.moe.num_experts] * plan.moe.num_experts]
        moe = _moe_terms(text, plan, tokens, 2, chunk, stored_bytes, max(counts), 2)
        host = {**caches, "moe_input": tokens * hidden * FP32}
        if gpu:
            host["expert_reads"] = int(chunk * 3 * hidden * text.intermediate_size * (stored_bytes + candidate_bytes))
        phases.append(Phase(f"layer {index}", host, {"layers": 2 * layer, **moe}))
        choice_layers.append({"layers": layer, **_moe_terms(text, plan, pass_tokens, 1, chunk, stored_bytes, 0, 1)})
    logit_rows = max(1, settings.batch // 2) * settings.ctx  # evaluate._score's windows per step
    phases.append(Phase("score", dict(caches), {"final": 2 * vocab * hidden * FP32, "logits": 2 * logit_rows * vocab * FP32,
                                                "metric_work": METRIC_WORKSPACE * DEFAULT_CHUNK_ELEMENTS}))
    if settings.choices is not None:
        heaviest = max(choice_layers, key=lambda terms: sum(terms.values()))
        phases.append(Phase("choices", {"pass_hidden": pass_tokens * hidden * FP32}, heaviest))
        phases.append(Phase("choices score", {"pass_hidden": pass_tokens * hidden * FP32},
                            {"final": vocab * hidden * FP32, "choice_logits": CHOICE_LOGIT_ROWS * vocab * (FP32 + 8 + 8)}))
    return phases


def _forward_flops(table, text, tokens: float, span: float) -> tuple[float, float]:
    """(sum_l F_l, sum_l R_l) x `tokens`: one forward of every layer over `tokens` tokens whose
    attention spans `span` tokens, and the routed experts' part alone."""
    forward = routed = 0.0
    for index in range(text.num_hidden_layers):
        plan = table.plan(text, index)
        moe_names = set(plan.moe.fused_names) if plan.moe else set()
        forward += tokens * 2 * _active_weights(plan, moe_names) + attention_flops(text, plan, tokens, span)
        if plan.moe is not None:
            routed += tokens * 2 * plan.moe.top_k * _expert_weights(plan)
    return forward, routed


def choice_passes(settings: ValidationSettings, hidden: int) -> list[int]:
    """Tokens of each pass over the weights in the choices benchmarks (`hellaswag.group_blocks`)."""
    if settings.choices is None:
        return []
    blocks = settings.choices.blocks
    return [sum(blocks[i] for i in group) for group in group_blocks([n * hidden * FP32 for n in blocks], settings.pass_mib)]


def plan_validation(table, text, settings: ValidationSettings, reference_bytes: int, stored_bytes: float,
                    candidate_bytes: int, candidate_weights: int, candidate_expert_share: float,
                    device: str = "cpu", shares: dict | None = None) -> ValidationPlan:
    """The validation plan of `text`'s model on `device` ("cpu" or "cuda") against a candidate
    of `candidate_bytes` on disk holding `candidate_weights` quantized weights (a bundle,
    dequantized where the layers run), `candidate_expert_share` of both in routed experts;
    the reference checkpoint holds `reference_bytes`, `stored_bytes` per weight. `shares`:
    measured routing per MoE layer (None: even)."""
    passes = choice_passes(settings, text.hidden_size)
    tokens = settings.windows * settings.ctx
    phases = _phases(table, text, settings, stored_bytes, candidate_bytes / max(candidate_weights, 1), shares or {},
                     max(passes, default=0), device != "cpu")
    if device == "cpu":
        phases = [Phase(phase.name, {**phase.host, **phase.device}, {}) for phase in phases]
    forward, routed = _forward_flops(table, text, tokens, settings.ctx)
    flops = 3 * forward + routed + 2 * 2 * tokens * text.hidden_size * text.vocab_size
    reads = reference_bytes + candidate_bytes * (1 + candidate_expert_share)
    dequantized = candidate_weights * (1 + candidate_expert_share)
    choices = settings.choices
    if choices is not None:
        choice_forward, _ = _forward_flops(table, text, sum(choices.blocks), choices.row_length)
        flops += 2 * (choice_forward + 2 * choices.scored * text.hidden_size * text.vocab_size)
        reads += len(passes) * (reference_bytes + candidate_bytes)
        dequantized += len(passes) * candidate_weights
    cache_bytes = 2 * tokens * text.hidden_size * FP32
    return ValidationPlan(settings, phases, float(flops), int(reads), text.num_hidden_layers * cache_bytes,
                          int(dequantized), 2 * cache_bytes, len(passes), device)


def time_validation(plan: ValidationPlan, rates: dict | None, disk) -> None:
    """Fill `plan.seconds` from the device's measured `rates` (compute_rates) and `disk`'s
    (disk.DiskRates); left None when either is missing."""
    if rates is None or disk is None:
        return
    plan.seconds = {"compute": plan.flops / rates["matmul_flops_per_s"], "read": plan.read_bytes / disk.read,
                    "write": plan.write_bytes / disk.write}
    if plan.device == "cpu":
        plan.seconds["dequantize"] = plan.dequantized_weights * rates["dequantize_seconds_per_weight"]


def render_validation(plan: ValidationPlan, baseline: int) -> list[str]:
    """The validation section of `plan`'s Markdown report."""
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    terms = lambda d: ", ".join(f"{k} {gib(v)}" for k, v in d.items())  # noqa: E731
    settings, host, device = plan.settings, plan.peak("host"), plan.peak("device")
    choices = settings.choices
    lines = ["", f"## Validating the bundle against the model ({settings.windows} x {settings.ctx} tokens, batch "
             f"{settings.batch}" + (f"; {sum(choices.blocks):,} multiple-choice tokens in {plan.choice_passes} "
                                    f"pass(es)" if choices else "") + ")", "",
             f"- peak host memory {gib(baseline + sum(host.host.values()))} ({host.name}: {terms(host.host)})"]
    if plan.device != "cpu":
        lines.append(f"- peak GPU memory {gib(sum(device.device.values()))} ({device.name}: {terms(device.device)})")
    lines.append(f"- reads {plan.read_bytes / 1e9:.1f} GB, writes {plan.write_bytes / 1e9:.1f} GB (both hidden-state "
                 f"caches after every layer, for --resume; {gib(plan.resume_bytes)} on disk at most), dequantizes "
                 f"{plan.dequantized_weights / 1e9:.1f} B weights (on the {'host' if plan.device == 'cpu' else 'GPU'}), "
                 f"{plan.flops / 1e12:.1f} TFLOP")
    if plan.seconds is None:
        lines.append("- estimated time: not estimated (see the quantize assumptions)")
    else:
        total = sum(plan.seconds.values())
        lines.append(f"- estimated time {total / 3600:.2f} h ({total:.0f} s: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in plan.seconds.items()) + ")")
    if choices is not None and not choices.measured:
        lines.append(f"- multiple-choice tokens assumed: {HELLASWAG_PADDED_TOKENS_PER_TASK:.0f} per HellaSwag task "
                     f"(SmolLM2's tokenizer over the whole validation split; its first 1,000 tasks average 90): an "
                     f"upper bound; give --hellaswag FILE and a model with its tokenizer to count them")
    return lines


def validation_settings(windows: int, ctx: int, batch: int, tasks: int | None = None, pass_mib: int = 8192,
                        model_dir=None, data=None, benchmark=None, benchmark_kind: str = "hellaswag",
                        protocol: str = "gptq") -> tuple[ValidationSettings, list[str]]:
    """The settings of a validation to plan and how its token counts were found. With the
    model's tokenizer (`model_dir`) and the files at hand, the windows are cut from `data` and
    the multiple-choice tasks (`benchmark`, the first `tasks`; HellaSwag text or a `choices`
    JSONL) encoded as `validate` does; otherwise `windows` (the --max-windows) and `tasks`
    HellaSwag tasks at the measured averages are assumed."""
    from pathlib import Path

    from maverick_quant.recipe import MoESpec

    tokenizer, notes = _tokenizer(model_dir), []
    if tokenizer is not None and data is not None and Path(data).is_file():
        from maverick_quant.calibration.data import eval_windows

        windows = eval_windows(data, tokenizer, ctx, windows, protocol).shape[0]
        notes.append(f"validation windows: {windows} cut from {data}")
    else:
        notes.append(f"validation windows: {windows} assumed (the text or the tokenizer is not here to cut them)")
    choices = None
    if tokenizer is not None and benchmark is not None and Path(benchmark).is_file():
        from maverick_quant.validation.hellaswag import encode_task, read_choice_jsonl, read_hellaswag

        read = read_hellaswag if benchmark_kind == "hellaswag" else read_choice_jsonl
        choices = ChoiceTokens.of([encode_task(task, tokenizer) for task in read(Path(benchmark), tasks)])
        notes.append(f"multiple-choice tokens: measured on {benchmark}")
    elif benchmark is not None or tasks:
        if not tasks:
            from maverick_quant.errors import InputError

            why = "not found" if not Path(benchmark).is_file() else "no tokenizer in the model directory to count its tokens"
            raise InputError(f"{benchmark}: {why}; give the number of tasks (--hellaswag-tasks, or the recipe's "
                             "validation.hellaswag_tasks) to plan them at the measured average")
        choices = ChoiceTokens.assumed(tasks)
    return ValidationSettings(windows, ctx, batch, MoESpec.chunk_mib, choices, pass_mib), notes


def _tokenizer(model_dir):
    """The model's tokenizer when `model_dir` has one, else None (a plan can be made without)."""
    from pathlib import Path

    if model_dir is None or not any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from maverick_quant.calibration.data import load_tokenizer

    return load_tokenizer(Path(model_dir))
