"""Reference vs candidate on the same token windows, both streamed layer by layer in lockstep.

Memory holds the two hidden-state caches [W, L, D] and one layer of each model (an MoE
layer's routed experts one chunk at a time, plus a third cache for that layer). For every
layer it also measures the candidate layer's relative output error on the reference's
inputs, err_l = ||f_c(h) - f_r(h)||^2 / ||f_r(h) - h||^2 (the error relative to what the
layer adds to the residual stream), which localises damage to a layer; for an MoE layer, also
each routed expert's error on the reference's routed inputs and the routing agreement of the
two models (validation/experts.py).

Protocols (see calibration.data.eval_windows): "gptq", non-overlapping windows of `ctx`
tokens from the start of the text, every token after the first of each window scored (the
GPTQ paper's perplexity); "llama.cpp", the same windows with BOS first and only the second
half of each window scored (`llama-perplexity`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from maverick_quant.calibration.moe import Routing
from maverick_quant.errors import InputError, kept_when_refused
from maverick_quant.host_memory import release_free_memory
from maverick_quant.recipe import MoESpec
from maverick_quant.streaming import StreamingModel, WeightSource, require_finite_hidden
from maverick_quant.validation.experts import (ExpertError, candidate_block_input, compare_expert_chunk,
                                               routing_agreement, squared_norm, summarize_experts, summarize_routing)
from maverick_quant.validation.metrics import MetricAccumulator
from maverick_quant.validation.progress import ValidationState


@dataclass
class Evaluation:
    """What `evaluate` measured: the metric summary (with "layers", and for an MoE model
    "experts" and "routing"), per-token KL and per-layer errors."""

    summary: dict
    kl_values: torch.Tensor
    layer_errors: list[tuple[str, float]] = field(default_factory=list)


def open_candidate(path: Path):
    """A WeightSource for a bundle, a packed export (GPTQ, AWQ, compressed-tensors) or a plain
    float model directory. (Exports have a manifest.json too: the bundle's names its format.)"""
    from maverick_quant.bundle import BUNDLE_FORMAT, Bundle
    from maverick_quant.checkpoint import manifest_format, read_json_object, require_exists
    from maverick_quant.exporters.registry import LAYOUTS, open_export
    from maverick_quant.streaming import open_source

    path = Path(path)
    require_exists(path)
    if manifest_format(path, strict=True) == BUNDLE_FORMAT:
        return Bundle(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a bundle, an export or a model directory")
    quant = (read_json_object(path / "config.json") or {}).get("quantization_config")  # open_source names a bad file
    if isinstance(quant, dict) and quant.get("quant_method") in LAYOUTS:  # (a GGUF-converted float model also names a quant_method)
        return open_export(path)
    return open_source(path)


def _check_compatible(reference: WeightSource, candidate: WeightSource) -> None:
    ref, cand = reference.table.text_config(reference.config), candidate.table.text_config(candidate.config)
    for key in ("num_hidden_layers", "hidden_size", "vocab_size", "num_local_experts"):
        if getattr(ref, key, None) != getattr(cand, key, None):
            raise InputError(f"reference and candidate differ in {key}: {getattr(ref, key, None)} vs "
                             f"{getattr(cand, key, None)}")


@dataclass
class LayerResult:
    """What one layer's step measured: err_l, and for an MoE layer its routed experts' errors
    and routing agreement (validation/experts.py; None where the candidate runs its MoE layers
    whole, a kernel-backed bundle, so its routing is not seen)."""

    rel_error: float
    experts: list[ExpertError] = field(default_factory=list)
    routing_agreement: float | None = None
    routing_agreement_local: float | None = None

    def to_record(self) -> dict:
        """JSON form, kept by a resumable run (validation/progress.py)."""
        return {**dataclasses.asdict(self), "experts": [dataclasses.astuple(e) for e in self.experts]}

    @classmethod
    def from_record(cls, record: dict) -> "LayerResult":
        return cls(**{**record, "experts": [ExpertError(*fields) for fields in record["experts"]]})


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum (a - b)^2 over tensors [W, ...], accumulated in fp64 one row at a time: no [W, L, D]
    difference, let alone an fp64 copy of it, is made (on Maverick's 40 x 2048 windows that
    was 1.7 GB in fp32 and 3.4 GB per fp64 temporary, beside the caches)."""
    return sum(squared_norm(a[row] - b[row]) for row in range(a.shape[0]))


@torch.no_grad()
def _advance_layer(ref_model: StreamingModel, cand_model: StreamingModel, index: int,
                   h_ref: torch.Tensor, h_cand: torch.Tensor, chunk_mib: int = MoESpec.chunk_mib) -> LayerResult:
    """Run layer `index` of both models in place on their caches; returns err_l (and, for an
    MoE layer, what `_advance_moe_layer` measures)."""
    if ref_model.plan(index).moe is not None:
        return _advance_moe_layer(ref_model, cand_model, index, h_ref, h_cand, chunk_mib)
    ref_layer, cand_layer = ref_model.layer(index), cand_model.layer(index)
    error_sum, signal_sum = 0.0, 0.0
    for start in range(0, h_ref.shape[0], ref_model.batch):
        span = slice(start, start + ref_model.batch)
        x = h_ref[span].to(ref_model.device)
        y_ref = ref_model.apply(ref_layer, x)
        y_cand_on_ref = cand_model.apply(cand_layer, x)
        error_sum += squared_distance(y_cand_on_ref, y_ref)
        signal_sum += squared_distance(y_ref, x)
        h_ref[span] = y_ref
        h_cand[span] = cand_model.apply(cand_layer, h_cand[span])
    return LayerResult(error_sum / max(signal_sum, 1e-30))


@torch.no_grad()
def forward_layer(model: StreamingModel, index: int, hidden: torch.Tensor, chunk_mib: int = MoESpec.chunk_mib) -> None:
    """Layer `index` over every window of `hidden` [W, L, D], in place; an MoE layer's routed
    experts are read chunk by chunk (`chunk_mib`), never all at once (a model that
    `runs_experts` itself, a kernel-backed bundle, runs its MoE layers whole)."""
    forward_layer_blocks(model, index, [(model.layout, hidden)], chunk_mib)


@torch.no_grad()
def forward_layer_blocks(model: StreamingModel, index: int, blocks: list, chunk_mib: int = MoESpec.chunk_mib,
                         layer: torch.nn.Module | None = None) -> list[Routing] | None:
    """`forward_layer` over several caches, blocks = [(packed layout or None, hidden [S_b, L_b, D])],
    in place, reading the layer's weights (and each chunk of its experts) once for all blocks.
    `layer`: the layer as `streamed_layer` built it, if the caller has it. Returns each
    block's routing for an MoE layer run chunk by chunk, else None."""
    layer = streamed_layer(model, index) if layer is None else layer
    if model.plan(index).moe is None or getattr(model, "runs_experts", False):
        for layout, hidden in blocks:
            model.layout = layout
            model.run_layer(layer, hidden, out=hidden)
        return None
    from maverick_quant.experts import run_moe_blocks

    return run_moe_blocks(model, index, layer, blocks, chunk_mib)


def streamed_layer(model: StreamingModel, index: int) -> torch.nn.Module:
    """Layer `index` as `forward_layer_blocks` runs it: whole, or for an MoE layer whose experts
    are streamed chunk by chunk, without its routed experts."""
    if model.plan(index).moe is None or getattr(model, "runs_experts", False):
        return model.layer(index)
    return model.layer(index, model.layer_tensors(index, experts=False))


@torch.no_grad()
def _advance_moe_layer(ref_model: StreamingModel, cand_model: StreamingModel, index: int,
                       h_ref: torch.Tensor, h_cand: torch.Tensor, chunk_mib: int = MoESpec.chunk_mib) -> LayerResult:
    """`_advance_layer` for an MoE layer, routed experts streamed chunk by chunk from both
    models (never a whole layer's experts); one more cache [W, L, D] holds the reference input.

    1. The reference layer runs on h_ref, each chunk of its experts beside the candidate's same
       chunk: every candidate expert is measured on the reference's routed inputs (err_e).
    2. The candidate layer runs on the reference's input and on its own stream in one pass over
       its experts: err_l, and the routing agreement of each with the reference's routing.

    Device memory: in step 1 the block input of each model (one when their norms are equal)
    and the output, [T, D] each (T = W * L tokens); in step 2 an input and an output per cache,
    four [T, D]; plus one chunk of experts of each model in step 1, of the candidate in step 2."""
    h_in = h_ref.clone()
    cand_layer = streamed_layer(cand_model, index)
    routing, experts = _reference_moe_layer_measuring_experts(ref_model, cand_model, cand_layer, index, h_ref, chunk_mib)
    signal = squared_distance(h_ref, h_in)
    cand_routings = forward_layer_blocks(cand_model, index, [(cand_model.layout, h_in), (cand_model.layout, h_cand)],
                                         chunk_mib, cand_layer)  # h_in: the candidate layer's output on the reference's inputs
    error = squared_distance(h_in, h_ref)
    result = LayerResult(error / max(signal, 1e-30), experts)
    if cand_routings is not None:
        result.routing_agreement_local = routing_agreement(routing, cand_routings[0])
        result.routing_agreement = routing_agreement(routing, cand_routings[1])
    return result


@torch.no_grad()
def _reference_moe_layer_measuring_experts(ref_model: StreamingModel, cand_model: StreamingModel,
                                           cand_layer: torch.nn.Module, index: int, hidden: torch.Tensor,
                                           chunk_mib: int) -> tuple[Routing, list[ExpertError]]:
    """The reference's MoE layer `index` over `hidden` [W, L, D] in place, each chunk of its
    routed experts read beside the candidate's and compared on the reference's routing
    (`compare_expert_chunk`; the candidate's block input from its layer `cand_layer`'s norm);
    returns that routing and every routed expert's error sums.

    Memory on the device: the block's input for each model (one, unless AWQ scaled the
    candidate's), its output, and one chunk of experts of each model."""
    from maverick_quant.calibration.moe import activation
    from maverick_quant.experts import add_block_output, expert_chunks, read_experts, start_moe_block

    moe = ref_model.plan(index).moe
    layer = ref_model.layer(index, ref_model.layer_tensors(index, experts=False))
    x_ref, routing, out = start_moe_block(ref_model, layer, moe, hidden)
    x_cand = candidate_block_input(cand_layer.get_submodule(moe.residual_input), layer.get_submodule(moe.residual_input),
                                   hidden, x_ref)
    errors = []
    for first, count in expert_chunks(moe, ref_model.config, chunk_mib):
        reference = {k: v.to(ref_model.dtype) for k, v in read_experts(ref_model, index, first, count).items()}
        candidate = {k: v.to(ref_model.dtype) for k, v in read_experts(cand_model, index, first, count).items()}
        errors += compare_expert_chunk(index, x_ref, x_cand, routing, reference, candidate,
                                       activation(moe.activation), first, out)
    add_block_output(hidden, out)
    return routing, errors


@torch.no_grad()
def _score(ref_model: StreamingModel, cand_model: StreamingModel, windows: torch.Tensor,
           h_ref: torch.Tensor, h_cand: torch.Tensor, first: int = 1) -> MetricAccumulator:
    """Final norm + lm_head for both caches a few windows at a time; tokens first..L-1 of
    each window scored (from the logits at positions first-1..L-2)."""
    metrics = MetricAccumulator()
    step = max(1, ref_model.batch // 2)
    for start in range(0, windows.shape[0], step):
        span = slice(start, start + step)
        ref_logits = ref_model.logits(h_ref[span, first - 1 : -1].to(ref_model.device))  # scored where computed
        cand_logits = cand_model.logits(h_cand[span, first - 1 : -1].to(cand_model.device))
        vocab = ref_logits.shape[-1]
        metrics.update(ref_logits.reshape(-1, vocab), cand_logits.reshape(-1, vocab), windows[span, first:].reshape(-1))
        del ref_logits, cand_logits  # not alive beside the next step's: two [rows, V] at a time, not three
    return metrics


def evaluate(reference: WeightSource, candidate: WeightSource, windows: torch.Tensor,
             batch: int = 4, show_progress: bool = True, first_scored: int = 1,
             expert_chunk_mib: int = MoESpec.chunk_mib, kernels: str | None = None,
             device: torch.device | str = "cpu", state: ValidationState | None = None) -> Evaluation:
    """Perplexity of both, KL(ref || cand), top-1 agreement and per-layer error on `windows`
    [W, L], scoring positions first_scored..L-1 of each window (routed experts read
    `expert_chunk_mib` at a time), layers computed on `device`, hidden states on the host.
    With `kernels` (a backend name), a bundle candidate runs its 4-bit weights through that
    backend, on `device`, instead of being dequantized to float. With a `state`, each finished
    layer is recorded there and a run resumed from it goes on at the next layer."""
    _check_compatible(reference, candidate)
    started = time.perf_counter()
    ref_model = StreamingModel(reference, batch=batch, device=device)
    if kernels is None:
        cand_model = StreamingModel(candidate, batch=batch, device=device)
    else:
        from maverick_quant.runtime import KernelModel

        cand_model = KernelModel(candidate, kernels, batch=batch, device=device)
    start, caches, steps = _resume_layers(state, lambda: {"reference": ref_model.embed(windows),
                                                           "candidate": cand_model.embed(windows)})
    h_ref, h_cand = caches["reference"], caches["candidate"]
    for index in _layer_bar(ref_model.num_layers, start, windows, "validate layers", show_progress):
        with kept_when_refused(index):
            steps.append(_advance_layer(ref_model, cand_model, index, h_ref, h_cand, expert_chunk_mib))
            require_finite_hidden(h_ref, index, f"{reference_folder(reference)}: the reference's")
        _record_layer(state, index, caches, steps)
        release_free_memory()
    metrics = _score(ref_model, cand_model, windows, h_ref, h_cand, first_scored)
    summary = metrics.summary()
    summary["seconds"] = time.perf_counter() - started
    summary.update(_layer_summary(steps))
    return Evaluation(summary, metrics.kl_values(), [(f"layer {i}", step.rel_error) for i, step in enumerate(steps)])


def reference_folder(reference: WeightSource):
    """The reference's model folder, for messages (a candidate can break, the reference it is
    judged against cannot: its hidden states are checked finite after every layer)."""
    return getattr(getattr(reference, "checkpoint", None), "model_dir", "the reference")


def _resume_layers(state: ValidationState | None, fresh) -> tuple[int, dict[str, torch.Tensor], list[LayerResult]]:
    """(first layer to run, the caches entering it, results of the layers before it): from the
    `state` of an interrupted run, else (0, fresh(), [])."""
    resumed = state.load_layers() if state is not None else None
    if resumed is None:
        return 0, fresh(), []
    start, caches, records = resumed
    return start, caches, [LayerResult.from_record(record) for record in records]


def _record_layer(state: ValidationState | None, index: int, caches: dict[str, torch.Tensor],
                  steps: list[LayerResult]) -> None:
    """Keep layer `index` as finished in `state` (if any): the caches now entering the next layer."""
    if state is not None:
        state.save_layers(index + 1, caches, [step.to_record() for step in steps])


def _layer_bar(layers: int, start: int, windows: torch.Tensor, desc: str, show_progress: bool):
    """Yield layer indices start..layers-1 under a progress bar of all `layers` (those finished
    by an earlier attempt counted) with the tokens per second through the whole model."""
    started = time.perf_counter()
    with tqdm(total=layers, initial=start, desc=desc, unit="layer", disable=not show_progress) as bar:
        for index in range(start, layers):
            yield index
            bar.update()
            per_layer = windows.numel() * (index + 1 - start) / (time.perf_counter() - started)
            bar.set_postfix(tok_per_s=f"{per_layer / layers:.0f}")


def _layer_summary(steps: list[LayerResult]) -> dict:
    """The report's "layers" (err_l, and routing agreement for MoE layers) and, for an MoE
    model, its "experts" and "routing" entries (validation/experts.py)."""
    layers = []
    for index, step in enumerate(steps):
        row = {"layer": index, "rel_error": step.rel_error}
        if step.routing_agreement is not None:
            row.update(routing_agreement=step.routing_agreement, routing_agreement_local=step.routing_agreement_local)
        layers.append(row)
    experts = [error for step in steps for error in step.experts]
    out = {"layers": layers}
    if experts:
        out["experts"] = summarize_experts(experts)
    routing = summarize_routing(layers)
    if routing:
        out["routing"] = routing
    return out


def import_llama_cpp(path: Path):
    """llama-cpp-python's module, or InputError naming the GGUF candidate `path` that needs it."""
    try:
        import llama_cpp
    except ImportError:
        raise InputError(f"{path}: a GGUF candidate runs in llama.cpp; install llama-cpp-python") from None
    return llama_cpp


class GGUFCandidate:
    """A GGUF file run by llama.cpp (llama-cpp-python): it memory-maps the file itself, so the
    candidate is never streamed by us; only its logits for each window are read. `gpu_layers`:
    llama.cpp's n_gpu_layers (-1: all), honoured when llama-cpp-python was built with a GPU."""

    def __init__(self, path: Path, threads: int | None = None, gpu_layers: int = 0):
        import os

        llama_cpp = import_llama_cpp(path)

        self.path = Path(path)
        self._llama_cpp, self._model, self._threads = llama_cpp, None, threads or os.cpu_count()
        self._gpu_layers = gpu_layers

    def check_loads(self, vocab_size: int) -> None:
        """InputError unless the file is a whole GGUF (gguf-py reads every tensor's place in it:
        a truncated download fails here) that llama.cpp loads (its header and vocabulary, no
        weights), with `vocab_size` tokens, the reference's: before any work is done."""
        import gguf

        try:
            gguf.GGUFReader(self.path)
            vocab = self._llama_cpp.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError, KeyError, IndexError) as exc:
            raise InputError(f"{self.path}: not a GGUF llama.cpp can load ({exc})") from None
        tokens = vocab.n_vocab()
        del vocab
        if tokens != vocab_size:
            raise InputError(f"{self.path}: its vocabulary has {tokens} tokens, the reference's {vocab_size}")

    def _context(self, tokens: int):
        """The llama.cpp context, (re)made large enough for `tokens` tokens (to the next multiple of
        512: its logits buffers hold context x vocabulary floats, 0.8 GB per 1,024 tokens of
        Maverick's vocabulary, so no power-of-two headroom; the old model is freed first, never
        two copies at once), its KV cache empty."""
        if self._model is None or self._model.n_ctx() < tokens:
            import gc

            context = -(-tokens // 512) * 512  # short sequences (benchmark choices) reuse one context
            self._model = None
            gc.collect()
            self._model = self._llama_cpp.Llama(model_path=str(self.path), n_ctx=context, n_batch=context,
                                                logits_all=True, n_threads=self._threads, verbose=False,
                                                n_gpu_layers=self._gpu_layers)
        self._model.reset()
        return self._model

    def _scores(self, first: int, last: int) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(np.array(self._model.scores[first:last], dtype=np.float32))

    def window_logits(self, window: list[int]) -> torch.Tensor:
        """Logits [L, V] llama.cpp computes for one window (its KV cache reset first)."""
        self._context(len(window)).eval(window)
        return self._scores(0, len(window))

    def branch_logits(self, prefix: list[int], suffixes: list[list[int]]) -> list[torch.Tensor]:
        """For each suffix, the logits [len(suffix), V] predicting its tokens after `prefix`:
        the prefix is evaluated once and kept in the KV cache, each suffix evaluated after it
        (llama.cpp drops the previous suffix's cache entries when it evaluates from n_tokens)."""
        model = self._context(len(prefix) + max(map(len, suffixes)))
        model.eval(prefix)
        last_prefix = self._scores(len(prefix) - 1, len(prefix))
        out = []
        for suffix in suffixes:
            model.n_tokens = len(prefix)
            model.eval(suffix)
            out.append(torch.cat([last_prefix, self._scores(len(prefix), len(prefix) + len(suffix) - 1)]))
        return out


@torch.no_grad()
def evaluate_gguf(reference: WeightSource, candidate: GGUFCandidate, windows: torch.Tensor, batch: int = 4,
                  show_progress: bool = True, first_scored: int = 1, device: torch.device | str = "cpu",
                  state: ValidationState | None = None) -> Evaluation:
    """`evaluate` for a GGUF candidate: the reference streamed to its final hidden states (on
    `device`; resumable through `state` as in `evaluate`), the candidate's logits from llama.cpp
    window by window (no per-layer errors: llama.cpp runs the whole model)."""
    started = time.perf_counter()
    ref_model = StreamingModel(reference, batch=batch, device=device)
    start, caches, _ = _resume_layers(state, lambda: {"reference": ref_model.embed(windows)})
    hidden = caches["reference"]
    for index in _layer_bar(ref_model.num_layers, start, windows, "reference layers", show_progress):
        with kept_when_refused(index):
            forward_layer(ref_model, index, hidden)
            require_finite_hidden(hidden, index, f"{reference_folder(reference)}: the reference's")
        _record_layer(state, index, caches, [])
    metrics = MetricAccumulator()
    llama_started = time.perf_counter()
    bar = tqdm(range(windows.shape[0]), desc="llama.cpp windows", unit="window", disable=not show_progress)
    for row in bar:
        ref_logits = ref_model.logits(hidden[row, first_scored - 1 : -1])
        cand_logits = candidate.window_logits(windows[row].tolist())[first_scored - 1 : -1]
        if cand_logits.shape != ref_logits.shape:
            raise InputError(f"{candidate.path}: llama.cpp logits {tuple(cand_logits.shape)} do not match the "
                             f"reference's {tuple(ref_logits.shape)} (vocabulary size?)")
        metrics.update(ref_logits, cand_logits, windows[row, first_scored:])
        bar.set_postfix(tok_per_s=f"{windows.shape[1] * (row + 1) / (time.perf_counter() - llama_started):.0f}")
    summary = metrics.summary()
    summary["seconds"] = time.perf_counter() - started
    summary["layers"] = []
    return Evaluation(summary, metrics.kl_values(), [])
