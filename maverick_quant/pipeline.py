"""Orchestration of a quantize run: streaming + capture + compress -> bundle.

Sequential GPTQ: for each decoder layer, in the table's group order (q/k/v, o, gate/up,
down), collect the group's input Hessian by running the layer (whose earlier groups are
already quantized) over the cached hidden states of all calibration windows, solve, and
put the dequantized weights back; then the quantized layer produces the next layer's
inputs. From o's pass on, the attention is computed once and replayed (attention_replay.py).
RTN needs no calibration and runs no forward at all.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from maverick_quant import __version__
from maverick_quant.attention_replay import AttentionReplay, last_core_group
from maverick_quant.bundle import BundleWriter, ReadOnlyWriter, copy_model_files
from maverick_quant.arch.base import LinearGroup
from maverick_quant.calibration.data import CalibrationSet
from maverick_quant.compress.grid import rtn_quantize
from maverick_quant.experts import (ExpertChunks, capture_block_io, check_expert_budget, quantize_moe_block,
                                    rtn_moe_block)
from maverick_quant.awq_layer import awq_scale_layer
from maverick_quant.groups import group_hessian, layer_hessians, linear_grid, mark_linears, quantized_linears, set_weight, solve_group
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.devices import device_label, peak_device_mib, quantized_to, reset_peak_memory, use_device
from maverick_quant.distributed import ExpertParallel
from maverick_quant.errors import InputError, kept_when_refused
from maverick_quant.host_memory import peak_rss_mib, release_free_memory
from maverick_quant.recipe import Method, QuantizeSpec, QuantSpec, grid_changes
from maverick_quant.resume import RunState, warn_if_resumed_elsewhere
from maverick_quant.streaming import CheckpointSource, StreamingModel, check_tied_head, require_finite_hidden


@dataclass(frozen=True)
class RunSummary:
    """What a quantize run reports at the end."""

    seconds: float
    peak_rss_mib: float
    mean_rel_loss: float | None
    layers: int
    device: str = "cpu"
    peak_device_mib: float | None = None  # peak CUDA allocation; None on the CPU


def quantize_groups_gptq(model: StreamingModel, layer: torch.nn.Module, hidden: torch.Tensor,
                         groups: tuple[LinearGroup, ...], spec: QuantizeSpec,
                         replay: AttentionReplay | None = None) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    """GPTQ the linears of `groups`, in order. True-sequential: each group's statistics are
    collected (a pass of the layer up to its input) after the groups before it were quantized;
    once the attention's q/k/v are solved, the first pass keeps the attention's output
    projection inputs in `replay` and the later ones replay them (attention_replay.py).
    Otherwise all statistics come from the float layer, in one pass plus the values' eager pass
    (`layer_hessians`). Layer weights end up dequantized."""
    quantized, stats = {}, {}
    live = tuple(group for group in groups if quantized_linears(layer, group.linears))  # else no statistics needed
    hessians = None if spec.true_sequential else iter(layer_hessians(model, layer, hidden, live))
    table = model.table
    core = last_core_group(live, table.attention, table.attention_output)
    for index, group in enumerate(live):
        with replay.around_pass() if replay is not None and index > core else contextlib.nullcontext():
            H, tokens = group_hessian(model, layer, hidden, group) if hessians is None else next(hessians)
        group_quantized, group_stats = solve_group(layer, group, H, tokens, spec)
        quantized.update(group_quantized)
        stats.update(group_stats)
    return quantized, stats


def quantize_layer_gptq(model: StreamingModel, index: int, layer: torch.nn.Module, hidden: torch.Tensor,
                        spec: QuantizeSpec, store: ExpertChunks | None) -> tuple[dict[str, QuantizedWeight], dict]:
    """GPTQ layer `index` and advance `hidden` [S, L, D] to its (quantized) output.

    Dense groups first; an MoE block is then solved by `experts.quantize_moe_block`, which
    streams routed experts through `store`. The output pass of a dense layer, and an MoE
    layer's pass to its block, replay the attention kept by the groups' passes
    (true-sequential; attention_replay.py)."""
    plan, table = model.plan(index), model.table
    replay = None
    if spec.true_sequential:
        replay = AttentionReplay(layer.get_submodule(table.attention), layer.get_submodule(table.attention_output),
                                 hidden.shape[0])
    quantized, stats = quantize_groups_gptq(model, layer, hidden, plan.groups, spec, replay)
    with replay.replaying_if_kept() if replay is not None else contextlib.nullcontext():
        if plan.moe is None:
            model.run_layer(layer, hidden, out=hidden)
            return quantized, stats
        x = capture_block_io(model, layer, plan.moe, hidden)
    del replay
    moe_quantized, moe_stats = quantize_moe_block(model, index, layer, hidden, spec, store, x)
    return {**quantized, **moe_quantized}, {**stats, **moe_stats}


def rtn_linears(layer: torch.nn.Module, names: tuple[str, ...],
                spec: QuantizeSpec) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    """Round-to-nearest the linears `names` of `layer` (but those kept in float), putting the
    dequantized weights back; stats hold each one's relative weight error."""
    quantized, stats = {}, {}
    for name in quantized_linears(layer, names):
        weight = layer.get_submodule(name).weight.data.float()
        quantized[name] = q = rtn_quantize(weight, linear_grid(layer, name, spec))
        set_weight(layer, name, q)
        error = (q.dequantize() - weight).square().sum() / weight.square().sum().clamp_min(1e-30)
        stats[name] = {"weight_rel_error": float(error)}
    return quantized, stats


def quantize_layer_rtn(model: StreamingModel, index: int, layer: torch.nn.Module,
                       spec: QuantizeSpec, store: ExpertChunks | None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Round-to-nearest every linear of layer `index` (routed experts chunk by chunk), no data."""
    plan = model.plan(index)
    router = (plan.moe.router,) if plan.moe is not None and spec.moe.quantize_router else ()
    quantized, stats = rtn_linears(layer, plan.linears + router, spec)
    if plan.moe is not None:
        stats.update(rtn_moe_block(model, index, spec, store))
    return quantized, stats


def quantize_layer_calibrated(model: StreamingModel, index: int, layer: torch.nn.Module, hidden: torch.Tensor,
                              spec: QuantizeSpec, store: ExpertChunks | None) -> tuple[dict[str, QuantizedWeight], dict]:
    """GPTQ, AWQ (scales + clipping, then RTN) or AWQ+GPTQ (then GPTQ) of layer `index`;
    advances `hidden` to the quantized layer's output."""
    awq_stats = {}
    if spec.method.searches_scales:
        awq_stats = awq_scale_layer(model, layer, hidden, model.plan(index), spec)
    if spec.method is Method.AWQ:
        plan = model.plan(index)
        quantized, stats = rtn_linears(layer, tuple(name for group in plan.groups for name in group.linears), spec)
        if plan.moe is None:
            model.run_layer(layer, hidden, out=hidden)
        else:  # AWQ-scaled experts, rounded to nearest chunk by chunk
            moe_quantized, moe_stats = quantize_moe_block(model, index, layer, hidden, spec, store)
            quantized, stats = {**quantized, **moe_quantized}, {**stats, **moe_stats}
    else:
        quantized, stats = quantize_layer_gptq(model, index, layer, hidden, spec, store)
    return quantized, {**stats, **awq_stats}


def _model_level_names(source: CheckpointSource) -> list[str]:
    """Embeddings, final norm, an untied lm_head, and every tensor under the table's
    pass-through prefixes (a vision tower and its projector)."""
    table, names = source.table, source.checkpoint.tensors
    wanted = [table.embed, table.final_norm] + ([table.lm_head] if table.lm_head in names else [])
    if table.passthrough_prefixes:
        wanted += [name for name in names if name.startswith(table.passthrough_prefixes)]
    return wanted


def _model_level_tensors(source: CheckpointSource) -> dict[str, torch.Tensor]:
    """The model-level tensors (`_model_level_names`), unchanged."""
    return {name: source.checkpoint.get(name) for name in _model_level_names(source)}


def check_model_level_tensors(source: CheckpointSource) -> None:
    """Read every model-level tensor once (readable dtype, finite: `Checkpoint.get`) and drop
    it, before the first layer: they are written after the last layer, and a bad one found
    there would throw away the whole run (for Maverick about 6 GB read: embeddings, lm_head
    and the vision tower)."""
    for name in _model_level_names(source):
        source.checkpoint.get(name)
    check_tied_head(source)


def _mean_rel_loss(writer: BundleWriter, num_layers: int) -> float | None:
    """Mean relative loss of the dense linears over every layer's stats record, the layers a
    resumed run kept included (None when none recorded one)."""
    losses = [info["rel_loss"] for index in range(num_layers)
              for info in writer.layer_record(index)["quantized"].values() if "rel_loss" in info]
    return sum(losses) / len(losses) if losses else None


def refuse_overridden_experts(source, spec: QuantizeSpec) -> None:
    """InputError, before any work, when a keep_float or bits override pattern matches routed
    experts of `source` (a model: its `table` and `text_config`): they are stored stacked on
    the run's one grid per projection."""
    text = source.text_config
    overrides = spec.keep_float or spec.bits_overrides
    for index in range(text.num_hidden_layers if overrides else 0):
        moe = source.table.plan(text, index).moe
        for linear in moe.expert_linears if moe is not None else ():
            stacked = f"{source.table.prefix(index)}{moe.experts}"
            for module in (f"{stacked}.{linear.name}",
                           *(f"{stacked}.{expert}.{linear.name}" for expert in range(moe.num_experts))):
                override = ("keep_float" if spec.keeps_float(module) else
                            "bits_overrides" if spec.weights_for(module) is not spec.weights else None)
                if override:
                    raise InputError(f"{override} matches the routed experts {module}: routed experts are quantized "
                                     "stacked on the run's grid and take no per-module override (narrow the pattern, "
                                     "e.g. to the shared expert or self_attn)")


def quantized_widths(table, text, spec: QuantizeSpec, experts: bool = True) -> Iterator[tuple[str, int, QuantSpec]]:
    """(full name, K, grid) of every linear the run quantizes, from the architecture `table`
    and the text config `text` alone: the layers' linears (and the router under
    `moe.quantize_router`) on their own grid, each routed-expert linear once per layer on the
    run's grid (overrides never match experts; left out with `experts` False)."""
    for index in range(text.num_hidden_layers):
        plan, prefix = table.plan(text, index), table.prefix(index)
        moe = plan.moe
        router = (moe.router,) if moe is not None and spec.moe.quantize_router else ()
        for name in plan.linears + router:
            if not spec.keeps_float(prefix + name):
                yield prefix + name, plan.shapes[f"{name}.weight"][1], spec.weights_for(prefix + name)
        for linear in moe.expert_linears if moe is not None and experts else ():
            yield f"{prefix}{moe.experts}.{linear.name}", plan.shapes[linear.fused][1], spec.weights  # fused [E, K, parts * N]


def _named_widths(found: list[tuple[str, int]]) -> str:
    return f"{', '.join(f'{name} (K={width})' for name, width in found[:4])}{', ...' if len(found) > 4 else ''}"


def refuse_unblockable_widths(source, spec: QuantizeSpec) -> None:
    """InputError, before any work, when the run's grid is one of llama.cpp's offset grids
    (`--gguf-grid Q4_1 / Q4_K`, whose blocks hold 32 columns; Q4_K's super-blocks fall back to
    Q4_1 where K is not a multiple of 256) and a linear it quantizes has K not a multiple of
    32, naming them: they were found in the middle of the run."""
    if spec.weights.gguf_grid is None:
        return
    found = [(name, width) for name, width, grid in quantized_widths(source.table, source.text_config, spec)
             if grid.gguf_grid and width % 32]
    if found:
        raise InputError(f"--gguf-grid {spec.weights.gguf_grid}: llama.cpp's blocks hold 32 input columns, and "
                         f"{len(found)} linears have K not a multiple of 32: {_named_widths(found)} "
                         "(keep them in float: --keep-float PATTERN)")


def rank_deficient_note(table, text, spec: QuantizeSpec, tokens: int) -> str | None:
    """A note when a GPTQ run's calibration holds fewer tokens than the input width K of a
    linear it solves (routed experts aside: they are audited per expert, `calibration.moe`).

    H = X^T X / n over the n calibration tokens X [n, K] has rank at most n, so for n < K
    GPTQ solves against a Hessian blind to K - n input directions: only the damping
    (`damp` x mean diag H) stands for them, and the solve fits the calibration text closely
    (on SmolLM2 with 512 tokens, below down_proj's K = 1536, GPTQ scored worse than RTN).
    None when every solved linear has K <= n, or the method solves no GPTQ."""
    if not spec.method.solves_gptq:
        return None
    found = [(name, width) for name, width, _ in quantized_widths(table, text, spec, experts=False) if width > tokens]
    if not found:
        return None
    widest = max(width for _, width in found)
    return (f"note: the calibration holds {tokens} tokens, fewer than the input width of {len(found)} linears GPTQ "
            f"solves: {_named_widths(found)}; their Hessians are rank-deficient (rank <= {tokens}) and the solve "
            f"fits the calibration text closely: give at least {widest} tokens (--samples x --seq-len), or raise --damp")


def refuse_untiled_groups(source, spec: QuantizeSpec, fmt: str) -> None:
    """InputError, before any work, for an export `fmt` whose layout needs groups that tile K
    (AWQ GEMM, compressed-tensors) when a linear the run quantizes has K not a multiple of its
    group size, naming them: a recipe found them only at its export step, hours in."""
    found = [(name, width) for name, width, grid in quantized_widths(source.table, source.text_config, spec)
             if grid.group_size > 0 and width % grid.group_size]
    if found:
        raise InputError(f"exports: format {fmt} needs K a multiple of the group size, and {len(found)} linears "
                         f"have another K: {_named_widths(found)} (another group_size, keep_float, or format gptq)")


def record_overridden_grids(layer: torch.nn.Module, quantized: dict, stats: dict, spec: QuantizeSpec) -> None:
    """Put the grid of each linear a bits override changed into its stats (the bundle's
    per-tensor record: `weights`, the fields that differ from the run's grid)."""
    for name in quantized:
        grid = linear_grid(layer, name, spec)
        if grid is not spec.weights:
            stats.setdefault(name, {})["weights"] = grid_changes(grid, spec.weights)


def quantize_model(source: CheckpointSource, calibration: CalibrationSet | None, spec: QuantizeSpec,
                   out_dir: Path, state: RunState | None = None, show_progress: bool = True,
                   parallel: ExpertParallel | None = None, device: torch.device | str = "cpu") -> tuple[dict, RunSummary]:
    """Quantize the whole model layer by layer into a bundle at `out_dir`. With a run `state`,
    progress is saved after every layer and an interrupted run goes on from where it stopped;
    the manifest records the state's identity as `run_identity`. With `parallel`, routed
    expert chunks are split across processes (distributed.py); only rank 0 writes `out_dir`.

    Memory: the calibration hidden states [S, L, D] (fp32) in host memory; one layer, its
    Hessians, an MoE block's caches and a chunk of experts on `device` (devices.py).
    """
    started = time.perf_counter()
    needs_data = spec.method is not Method.RTN
    if needs_data and calibration is None:
        raise InputError(f"--method {spec.method.value} needs calibration data (--data or --calib)")
    writes = parallel is None or parallel.writes
    writer = BundleWriter(out_dir) if writes else ReadOnlyWriter(out_dir)
    release_free_memory()
    device = torch.device(device)
    use_device(device)
    reset_peak_memory(device)
    resumed_from = warn_if_resumed_elsewhere(state, device_label(device))
    refuse_overridden_experts(source, spec)
    model = StreamingModel(source, batch=spec.batch_windows, device=device)
    check_expert_budget(model, spec.moe.chunk_mib)
    first_layer, hidden = state.load_progress(writer.completed_layers()) if state else (0, None)
    if parallel is not None:
        parallel.check_same_start(first_layer, state.folder if state else None)
    if first_layer < model.num_layers and writes:
        check_model_level_tensors(source)
    if needs_data and hidden is None and first_layer < model.num_layers:  # else only the finish is left
        hidden = model.embed(calibration.input_ids)
    release_free_memory()
    bar = tqdm(range(first_layer, model.num_layers), desc=f"{spec.method.value} layers", unit="layer",
               disable=not show_progress, initial=first_layer, total=model.num_layers)
    losses = []
    for index in bar:
        with kept_when_refused(index):
            layer_started = time.perf_counter()
            tensors = source.layer_tensors(index, experts=False)
            layer = model.layer(index, tensors)
            prefix, moe = model.table.prefix(index), model.plan(index).moe
            router = (moe.router,) if moe is not None and spec.moe.quantize_router else ()
            kept = mark_linears(layer, prefix, model.plan(index).linears + router, spec)
            store = moe and ExpertChunks(writer, state, index, f"{prefix}{moe.experts}.", spec.weights, parallel,
                                         show_progress)
            if needs_data:
                quantized, stats = quantize_layer_calibrated(model, index, layer, hidden, spec, store)
                require_finite_hidden(hidden, index, "the calibration windows'")
                losses.extend(stats[name]["rel_loss"] for name in quantized if "rel_loss" in stats[name])
                if losses:
                    bar.set_postfix(rel_loss=f"{sum(losses) / len(losses):.4f}")
            else:
                quantized, stats = quantize_layer_rtn(model, index, layer, spec, store)
            floats = model.plan(index).passthrough + tuple(f"{name}.weight" for name in kept)
            passthrough = {name: layer.get_parameter(name).data.to("cpu", tensors[name].dtype)  # AWQ may have folded scales in
                           for name in floats if name.removesuffix(".weight") not in quantized}
            quantized = quantized_to(quantized, "cpu")
            if kept:
                stats["kept_float"] = list(kept)
            record_overridden_grids(layer, quantized, stats, spec)
            stats["seconds"] = time.perf_counter() - layer_started
            writer.write_layer(index, prefix, quantized, passthrough, stats)
            if state is not None:  # after the last layer no hidden states are needed again
                state.save_progress(index + 1, hidden if index + 1 < model.num_layers else None, device_label(device))
        del layer, tensors, quantized, passthrough
        release_free_memory()
    del hidden
    if writes:
        writer.write_passthrough(_model_level_tensors(source))
        copy_model_files(source.checkpoint.model_dir, out_dir)
    summary = RunSummary(time.perf_counter() - started, peak_rss_mib(),
                         _mean_rel_loss(writer, model.num_layers) if needs_data and writes else None,
                         model.num_layers, str(device), peak_device_mib(device))
    manifest = writer.finish({
        "tool_version": __version__,
        "source": {"model_dir": str(source.checkpoint.model_dir), "fingerprint": source.checkpoint.fingerprint(),
                   "architecture": list(source.config.architectures)},
        "recipe": spec.to_dict(),
        "run_identity": state.identity if state is not None else None,
        "calibration": calibration.meta if calibration is not None else None,
        "summary": {"seconds": summary.seconds, "peak_rss_mib": summary.peak_rss_mib, "mean_rel_loss": summary.mean_rel_loss,
                    "device": summary.device, "peak_device_mib": summary.peak_device_mib,
                    **({"resumed_from_device": resumed_from} if resumed_from else {})},
    }, model.num_layers)
    return manifest, summary
