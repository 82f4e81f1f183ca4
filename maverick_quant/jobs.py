"""The work behind each CLI command, shared by the commands and `demo`.

Each function checks its inputs (refusing an existing output without force before any
work), runs one stage, writes its output atomically and prints a one-line summary.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from maverick_quant.errors import InputError
from maverick_quant.recipe import Method

if TYPE_CHECKING:
    from maverick_quant.distributed import ExpertParallel


def run_quantize(model_dir, out, spec, data, calib, calib_spec, force, progress, resume=False, device="auto",
                 drawn=None):
    """Shared by `quantize`, `demo` and `run`: check everything, calibrate (or take the windows
    `drawn` already, a CalibrationSet), quantize on `device` (devices.py; going on from an
    interrupted run's work directory with `resume`), print the summary."""
    from maverick_quant.bundle import Bundle
    from maverick_quant.calibration.data import overlap_note
    from maverick_quant.outputs import check_output_apart, check_output_dir
    from maverick_quant.devices import resolve_device
    from maverick_quant.pipeline import (quantize_model, rank_deficient_note, refuse_overridden_experts,
                                         refuse_unblockable_widths)
    from maverick_quant.distributed import ExpertParallel
    from maverick_quant.resume import run_identity
    from maverick_quant.streaming import open_source

    check_output_dir(out, force)
    check_output_apart(out, {"MODEL_DIR": model_dir, "--calib": calib, "--data": data})
    compute = resolve_device(device)
    source = open_source(model_dir)
    refuse_overridden_experts(source, spec)  # before calibrating, which may take long (--data self)
    refuse_unblockable_widths(source, spec)
    calibration = None
    if spec.method is not Method.RTN:
        if drawn is None and calib is None and data is None:
            raise InputError(f"--method {spec.method.value} needs --data FILE|self or --calib DIR")
        calibration = drawn if drawn is not None else _calibration(source, model_dir, data, calib, calib_spec)
        tokens = calibration.input_ids.numel()
        for note in (overlap_note(calibration), rank_deficient_note(source.table, source.text_config, spec, tokens)):
            if note:
                click.echo(note)
    identity = run_identity(source.checkpoint.fingerprint(), spec.to_dict(),
                            None if calibration is None else calibration.input_ids)
    parallel = ExpertParallel.from_env()  # under torchrun: routed experts split across the processes
    with contextlib.ExitStack() as stack:
        if parallel is not None:
            stack.callback(parallel.close)
        work, state = _enter_output(stack, out, identity, force, resume, parallel)
        manifest, summary = quantize_model(source, calibration, spec, work, state, parallel=parallel,
                                    show_progress=progress and (parallel is None or parallel.writes), device=compute)
        if parallel is not None:
            parallel.barrier()  # rank 0 renames the finished bundle only when every rank is done
    if parallel is not None and not parallel.writes:
        return summary
    loss = "n/a" if summary.mean_rel_loss is None else f"{summary.mean_rel_loss:.5f}"
    gpu = "" if summary.peak_device_mib is None else f", peak {summary.device} memory {summary.peak_device_mib:.0f} MiB"
    click.echo(f"quantized {summary.layers} layers on {summary.device} in {summary.seconds:.1f} s, peak RSS "
               f"{summary.peak_rss_mib:.0f} MiB{gpu}, mean relative GPTQ loss {loss} -> {out}")
    deficient = sum(bool(record.get("rank_deficient")) for layer in manifest["layers"]
                    for record in layer.get("experts", {}).get("audit", []))
    if deficient:
        from maverick_quant.calibration.moe import RANK_DEFICIENT_ADVICE

        click.echo(f"note: {deficient} experts were solved on Hessians from fewer rows than a projection's input "
                   f"width K (audit.json: rank_deficient); {RANK_DEFICIENT_ADVICE}")
    if problems := kernel_problems(Bundle(out)):
        click.echo(f"note: the 4-bit kernels (generate, validate --kernels) cannot run {len(problems)} linears of this "
                   f"bundle, e.g. {problems[0]}; validate without --kernels reads it (docs/kernels.md)")
    return summary


def kernel_problems(bundle) -> list[str]:
    """Why the 4-bit kernels cannot run each quantized linear of `bundle` that they cannot
    (`check_kernel_grid` on its grid and K). A linear a bits override put on another width than
    the bundle's runs as a plain float linear, so it is no problem."""
    def linears():
        for index, layer in enumerate(bundle.manifest["layers"]):
            for name, info in layer["quantized"].items():
                yield layer["prefix"] + name, info["shape"][-1], bundle.tensor_quant(index, name)
            for chunk in layer.get("experts", {}).get("chunks", [])[:1]:  # the experts are on the run's grid
                for name, shape in chunk["shapes"].items():
                    yield f"{layer['prefix']}experts.{name}", shape[-1], bundle.quant

    return kernel_grid_problems(linears(), bundle.quant["bits"])


def kernel_grid_problems(linears, run_bits: int) -> list[str]:
    """Why the 4-bit kernels cannot run each of `linears` ((full name, K, grid dict) triples)
    that they cannot (`check_kernel_grid`); a linear on another width than the run's `run_bits`
    (a bits override) runs as a plain float linear, so it is no problem."""
    from maverick_quant.compress.kernels.layout import check_kernel_grid
    from maverick_quant.recipe import offset_grid_name

    problems = []
    for name, width, grid in linears:
        if grid["bits"] != run_bits:
            continue
        try:
            check_kernel_grid(grid["bits"], grid["group_size"], width, name, offset_grid_name(grid))
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def _calibration(source, model_dir, data, calib, calib_spec):
    """The calibration windows of `quantize` and `imatrix`: `--calib DIR` checked against the model
    (ids inside its vocabulary, made by its tokenizer), or drawn now from `--data`."""
    from maverick_quant.calibration.data import load_calibration_for, make_calibration

    if calib:
        return load_calibration_for(Path(calib), model_dir, source.config)
    return make_calibration(model_dir, data, calib_spec)


def _enter_output(stack: contextlib.ExitStack, out: Path, identity: dict, force: bool, resume: bool,
                  parallel: "ExpertParallel | None"):
    """(work directory, run state) of this process. Under expert parallelism rank 0 prepares
    them (checks, lock, resume) and the other ranks then read its state without writing; if
    rank 0 refuses the output, the others stop too instead of waiting for it, and every rank
    stops unless all run the same inputs (`ExpertParallel.check_same_inputs`)."""
    from maverick_quant.resume import ReadOnlyState, resumable_output_dir, state_dir_for, work_dir_for

    if parallel is None:
        return stack.enter_context(resumable_output_dir(out, identity, force, resume))
    if parallel.writes:
        entered = None
        try:
            entered = stack.enter_context(resumable_output_dir(out, identity, force, resume))
        finally:
            parallel.agree(entered is not None)
    else:
        if not parallel.agree(True):
            raise InputError(f"{out}: rank 0 refused this output (its message says why); rank {parallel.rank} stops")
        entered = work_dir_for(out), ReadOnlyState(state_dir_for(out), identity)
    parallel.check_same_inputs(identity)
    return entered


def run_export(bundle_dir, out, fmt="gptq", max_shard_size=5 * 10**9, force=False, report_dir=None, progress=True):
    from maverick_quant.bundle import Bundle
    from maverick_quant.outputs import atomic_output_dir, check_output_apart, check_output_dir
    from maverick_quant.exporters.artifact import moe_packed_caution, write_artifact_files
    from maverick_quant.exporters.packed import export_packed, float_for_engines
    from maverick_quant.exporters.registry import LAYOUTS

    check_output_dir(out, force)
    check_output_apart(out, {"BUNDLE_DIR": bundle_dir})
    bundle = Bundle(bundle_dir)
    check_card_report(report_dir, bundle.manifest["source"]["fingerprint"], bundle)
    with atomic_output_dir(out, force) as tmp:
        files = export_packed(bundle, tmp, LAYOUTS[fmt], max_shard_size, progress)
        write_artifact_files(bundle, tmp, fmt, report_dir=report_dir)
    written_float = float_for_engines(bundle)
    if written_float:
        names = sorted({name for linears in written_float.values() for name in linears})
        click.echo(f"written as float {bundle.float_dtype()} (the bundle's values): {', '.join(names)} in "
                   f"{len(written_float)} layers; vLLM reads Llama 4's rope q/k and router right only as float "
                   "weights (docs/exports.md)")
    click.echo(f"exported {fmt}: {len(files)} files -> {out}")
    if caution := moe_packed_caution(bundle, fmt):
        click.echo(f"note: {caution} (docs/exports.md)")


def check_card_report(report_dir: Path | None, source_fingerprint: str, bundle) -> None:
    """Before any writing: the validation report an export's card quotes must be of this export's
    model (artifact.check_report_describes); a note names what an older report cannot show."""
    from maverick_quant.exporters.artifact import check_report_describes

    if report_dir is None:
        return
    unchecked = check_report_describes(Path(report_dir), source_fingerprint, bundle)
    if unchecked:
        click.echo(f"note: --report {report_dir} does not record {', '.join(unchecked)} (written by an older "
                   "version): the card quotes it unchecked on those")


def check_output_file(out: Path, force: bool, example: str, inputs: dict | None = None, option: str = "--out") -> None:
    """Refuse an existing output (unless forced), one of the `inputs` ({option: path}), or a
    directory where one file is written (`option` names the file's option in the message)."""
    from maverick_quant.outputs import check_output_apart, check_output_dir

    if Path(out).is_dir():
        raise InputError(f"{option} {out}: is a directory; this writes one file (e.g. {option} {example})")
    check_output_dir(out, force, is_file=True)
    check_output_apart(out, inputs or {}, option)


def run_imatrix(model_dir, out, data, calib, calib_spec, force, progress, chunk_mib, device="auto", resume=False):
    """llama.cpp imatrix GGUF of MODEL_DIR's float model over a calibration set, its layers run
    on `device`; each layer's sums and the hidden states after it are kept in `.NAME.resume`
    beside `out`, so that `resume` goes on with an interrupted run of the same inputs (walk.py)."""
    from maverick_quant.calibration.imatrix import collect_imatrix, write_imatrix_gguf
    from maverick_quant.devices import resolve_device, use_device
    from maverick_quant.resume import resumable_output_dir, run_identity
    from maverick_quant.streaming import open_source

    check_output_file(out, force, "model.imatrix.gguf", {"--data": data})
    compute = resolve_device(device)
    use_device(compute)
    if calib is None and data is None:
        raise InputError("imatrix needs --data FILE|self or --calib DIR")
    source = open_source(model_dir)
    calibration = _calibration(source, model_dir, data, calib, calib_spec)
    identity = run_identity(source.checkpoint.fingerprint(), {}, calibration.input_ids, job="imatrix")
    out = Path(out)
    with resumable_output_dir(out, identity, force, resume, single_file=True) as (work, state):
        imatrix = collect_imatrix(source, calibration.input_ids, chunk_mib=chunk_mib, show_progress=progress,
                                  device=compute, state=state)
        datasets = [str(calibration.meta.get("source") or calib or data)]
        write_imatrix_gguf(imatrix, work / out.name, datasets)
    click.echo(f"imatrix: {len(imatrix.entries)} linears over {imatrix.chunk_count} x {imatrix.chunk_size} tokens -> {out}")


def run_export_gguf(source_dir, out, gguf_type="Q4_0", requantize=False, pre=None, force=False, report_dir=None,
                    progress=True, mmproj=None, mmproj_type="F16"):
    """GGUF of a bundle (lossless on its grid, or --requantize), or of a float model directory
    (re-quantized by gguf-py, Q4_K by our round-to-nearest: the plain GGUF other tools make, as a baseline); with `mmproj`,
    a Llama 4's vision tower and projector too, as llama.cpp's multimodal projector file."""
    from maverick_quant.bundle import BUNDLE_FORMAT, Bundle
    from maverick_quant.checkpoint import manifest_format
    from maverick_quant.exporters.artifact import gguf_sidecars, write_gguf_sidecars
    from maverick_quant.exporters.gguf import FLOAT_GGUF_TYPES, export_gguf
    from maverick_quant.exporters.gguf_weights import BundleWeights, FloatWeights
    from maverick_quant.exporters.gguf_mmproj import MMProjPlan

    check_output_file(out, force, "model-q4_0.gguf")
    for sidecar in gguf_sidecars(Path(out)):  # written beside it: a user's file of that name is replaced too
        check_output_file(sidecar, force, sidecar.name, option="--out's sidecar")
    if mmproj is not None:
        check_output_file(mmproj, force, "mmproj-f16.gguf")
        if Path(mmproj).resolve() == Path(out).resolve():
            raise InputError(f"--mmproj {mmproj}: the same file as --out")
    is_bundle = manifest_format(Path(source_dir), strict=True) == BUNDLE_FORMAT
    weights = BundleWeights(Bundle(source_dir)) if is_bundle else FloatWeights(Path(source_dir))
    check_card_report(report_dir, weights.bundle.manifest["source"]["fingerprint"] if is_bundle
                      else weights.source.checkpoint.fingerprint(), weights.bundle if is_bundle else None)
    vision = MMProjPlan(weights, mmproj_type) if mmproj is not None else None  # checks all before any writing
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    report = export_gguf(weights, Path(out), gguf_type, requantize, pre, progress)  # renamed over `out` when complete
    for stale in gguf_sidecars(Path(out)):  # the replaced GGUF's card and manifest, which an mmproj failure would leave
        stale.unlink(missing_ok=True)
    lossless = (is_bundle and not report.requantized) or gguf_type in FLOAT_GGUF_TYPES
    detail = gguf_type if lossless else \
        f"{gguf_type} (re-quantized by {'our round-to-nearest' if gguf_type == 'Q4_K' else 'gguf-py'})"
    click.echo(f"exported gguf {gguf_type}: {report.tensors} tensors -> {out}")
    if report.requantized:
        errors = sorted(report.requantized.values())
        worst = max(report.requantized, key=report.requantized.get)
        click.echo(f"re-quantized {len(errors)} tensors to {gguf_type}: relative error added mean {sum(errors) / len(errors):.4f}, "
                   f"max {errors[-1]:.4f} ({worst})")
    if vision is not None:
        _write_mmproj(vision, Path(mmproj), progress)
        detail += f", vision tower as mmproj {mmproj_type}"
    write_gguf_sidecars(weights.bundle if is_bundle else None, weights.name, Path(out), detail, report_dir,
                        [Path(mmproj)] if vision is not None else [])


def _write_mmproj(plan, path: Path, progress: bool) -> None:
    """llama.cpp's projector file of a checked MMProjPlan at `path`, and what it holds, printed."""
    from maverick_quant.exporters.gguf_mmproj import export_mmproj

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = export_mmproj(plan, path, progress)
    click.echo(f"exported mmproj {plan.mmproj_type} (llama4 vision): {tensors} tensors -> {path}; "
               f"{plan.tokens_per_chunk} tokens per image chunk; image normalisation from {plan.normalisation}")
    if plan.f16_fallbacks:
        click.echo(f"kept F16 (K not a multiple of 32 for Q8_0): {', '.join(plan.f16_fallbacks)}")


def run_generate(bundle_dir: Path, prompt: str, max_new_tokens: int, kernels: str = "auto", chat: bool = False,
                 device: str = "auto") -> None:
    """Greedy generation from a bundle on the kernel backend `kernels` on `device`; streams the
    text (a plain prompt followed by its continuation; under `chat` the reply only), then prints
    the rate over the whole call (the prompt's prefill and any kernel compilation included).
    Generation stops at the EOS ids of the bundle's generation_config.json where it has one."""
    import torch
    from transformers import TextStreamer

    from maverick_quant.bundle import Bundle
    from maverick_quant.calibration.data import load_tokenizer
    from maverick_quant.devices import check_kernels_device, resolve_device, use_device
    from maverick_quant.model_config import check_positions
    from maverick_quant.runtime import backend_named, load_quantized_model

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # bytes from the shell that are not UTF-8 reach Python as surrogates
        raise InputError(f"--prompt: not UTF-8 text ({exc.reason} at character {exc.start})") from None
    bundle = Bundle(bundle_dir)
    compute = resolve_device(device)
    check_kernels_device(kernels, compute)
    use_device(compute)
    backend = backend_named(kernels, compute)
    # bf16 activations, except for the reference, and for Triton's CPU interpreter, which multiplies bf16 bit
    # patterns in tl.dot (triton-lang/triton#11584) and so would generate garbage
    dtype = torch.bfloat16 if backend.name != "reference" and not (backend.name == "triton" and compute.type != "cuda") \
        else torch.float32
    tokenizer = load_tokenizer(bundle_dir)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"--chat: {bundle_dir}'s tokenizer has no chat template; generate without --chat")
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise InputError("--prompt: empty, and this tokenizer adds no BOS token: give some text to continue")
    check_positions(bundle.config, ids.shape[1] + max_new_tokens,
                    f"--prompt ({ids.shape[1]} tokens) and --max-new-tokens {max_new_tokens}", bundle_dir)
    model = load_quantized_model(bundle, backend, dtype, compute)  # minutes for a large bundle: after the checks
    ids = ids.to(compute)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             streamer=TextStreamer(tokenizer, skip_prompt=chat, skip_special_tokens=True),
                             pad_token_id=tokenizer.eos_token_id)
    elapsed = time.perf_counter() - started
    new = out.shape[1] - ids.shape[1]
    click.echo(f"\n{new} tokens in {elapsed:.1f} s ({new / elapsed:.2f} tokens/s with the prompt's prefill, backend "
               f"{backend.name} on {compute}, prompt {ids.shape[1]} tokens)", err=True)


def run_plan(target: str, spec, calib_spec, json_out: Path | None = None, device: str | None = None,
             coverage: Path | None = None, validation: dict | None = None, remeasure: bool = False):
    """`maverick-quant plan`: print (and optionally write as JSON) the plan of a run on `device`
    (default: a recipe's quantize.device, else auto), with the routing measured in `coverage`
    (a coverage.json; None: even routing), and of validating its bundle: a recipe's validation
    step, else `validation` ({windows, ctx, batch, tasks}; None: not planned), with this machine's
    compute and disk rates measured again when `remeasure`, else as cached; returns it."""
    from maverick_quant.arch.llama4 import maverick_config
    from maverick_quant.arch.registry import table_for
    from maverick_quant.checkpoint import Checkpoint, load_json_object
    from maverick_quant.outputs import write_json_atomic
    from maverick_quant.plan import baseline_rss_bytes, expert_shares, make_plan, tensor_bytes
    from maverick_quant.plan_render import render
    from maverick_quant.plan_validation import validation_settings
    from maverick_quant.disk import measure_disk
    from maverick_quant.sources import cache_dir

    model_dir, validation_notes = None, []
    if target == "maverick":
        config = maverick_config()
    else:
        if str(target).endswith((".yaml", ".yml")):
            from maverick_quant.recipe_file import load_recipe

            recipe = load_recipe(Path(target))
            spec, calib_spec, target = recipe.quantize, recipe.calibration, str(_recipe_model_dir(recipe.model))
            device = device or recipe.device
            validation, validation_notes = _recipe_validation(recipe.validation) if recipe.validation else (validation, [])
        model_dir = Path(target)
        config = Checkpoint(model_dir).load_config() if any(model_dir.glob("*.safetensors")) else _config_only(model_dir)
    table = table_for(config, str(target))
    sizes, origin = tensor_bytes(model_dir, table, config)
    kind, rates = _plan_device(device or "auto", remeasure)
    shares = expert_shares(load_json_object(Path(coverage), "coverage.json"), Path(coverage)) if coverage else None
    try:
        disk, disk_note = measure_disk(Path.cwd(), model_dir, cache_dir(), remeasure), None
    except OSError as exc:  # e.g. a read-only current directory: plan without the disk time
        disk, disk_note = None, f"disk work not timed: its rates could not be measured here ({exc})"
    checked, notes = (None, []) if validation is None else validation_settings(**validation, model_dir=model_dir)
    notes += validation_notes
    result = make_plan(str(target), table, config, sizes, calib_spec, spec, rates, baseline_rss_bytes(table, config), kind,
                       shares, disk, checked)
    result.assumptions += ([disk_note] if disk_note else []) + notes
    result.assumptions.append(f"tensor sizes from {origin}")
    click.echo(render(result))
    if json_out is not None:
        write_json_atomic(Path(json_out), result.to_dict())
    return result


def _recipe_validation(step) -> tuple[dict, list[str]]:
    """`validation_settings`' arguments for a recipe's validation step, and what of the step
    the plan leaves out (said in its assumptions)."""
    benchmark, kind = (step.hellaswag, "hellaswag") if step.hellaswag else (step.choices, "choices")
    left_out = [f"validation of {name} not planned (the bundle's is)" for name in step.candidates if name != "bundle"]
    if step.hellaswag and step.choices:
        left_out.append(f"validation.choices {step.choices} not planned (validation.hellaswag is)")
    if step.kernels:
        left_out.append(f"validation.kernels {step.kernels}: planned as a dequantized bundle (the kernels run MoE "
                        "layers whole and never dequantize)")
    return ({"windows": step.max_windows, "ctx": step.ctx, "batch": step.batch, "tasks": step.hellaswag_tasks,
             "pass_mib": step.choices_pass_mib, "data": step.data, "benchmark": benchmark, "benchmark_kind": kind,
             "protocol": step.protocol}, left_out)


def _plan_device(name: str, remeasure: bool = False) -> tuple[str, dict | None]:
    """("cpu" | "cuda", the measured rates of that device here, or None when this machine has
    no such device: a plan for a GPU may be made anywhere, but only timed on one)."""
    import torch

    from maverick_quant.devices import device_kind, resolve_device
    from maverick_quant.compute_rates import machine_rates, rates_cache

    kind = device_kind(name)
    if kind == "cuda" and not torch.cuda.is_available():
        return kind, None
    device = resolve_device(kind)  # timed on this process's GPU whichever index was named
    return kind, machine_rates(rates_cache(device), device, remeasure)


def _config_only(model_dir: Path):
    from maverick_quant.model_config import load_model_config

    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: not a model directory (no config.json)")
    return load_model_config(model_dir)


def _recipe_model_dir(model: str) -> Path:
    from maverick_quant.recipe_file import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        from maverick_quant.sources import smollm2_hf_dir

        return smollm2_hf_dir()
    return Path(model)
