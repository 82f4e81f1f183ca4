"""The `validate` job: reference vs candidate on held-out text, benchmarks, gates, report.

The report directory is written as a resumable run (resume.resumable_output_dir and
validation/progress.py): built in `.REPORT.partial`, with every finished layer, the finished
evaluation and each finished benchmark kept in `.REPORT.resume`, so `--resume` after a crash
goes on from the last finished layer. Gates are not part of what is resumed: a resumed run
may gate differently, and a gate naming a key the report lacks keeps the finished work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import click
import torch

from maverick_quant import __version__
from maverick_quant.errors import InputError
from maverick_quant.recipe import CHOICES_PASS_MIB


@dataclass(frozen=True)
class VisionCheck:
    """`validate --mmproj`: a GGUF candidate's projector file, the image folder (None:
    synthetic images) and how many images to compare."""

    mmproj: Path
    images: Path | None = None
    count: int = 8


@dataclass(frozen=True)
class CandidateRun:
    """How a candidate will be evaluated, as far as the report's sections depend on it: a GGUF
    (llama.cpp runs it whole), on the 4-bit `kernels`, with its projector compared (`vision`)."""

    gguf: bool = False
    kernels: bool = False
    vision: bool = False


@dataclass(frozen=True)
class ValidationInputs:
    """What `validate` reads and checks before its evaluation (see read_validation_inputs)."""

    gates: list
    baseline: dict | None
    tokenizer: Any
    windows: torch.Tensor | None  # [W, ctx] token ids
    first_scored: int
    tasks: dict  # {"hellaswag" / "choices": (file, tasks)}
    facts: dict  # what the report will record of what it measures on (known_facts)


# The report section of each multiple-choice benchmark (by its name in ValidationInputs.tasks)
BENCHMARK_SECTION = MappingProxyType({"hellaswag": "hellaswag", "choices": "multiple_choice"})


def read_validation_inputs(reference, data, ctx, max_windows, protocol, gates, baseline, hellaswag, choices,
                           hellaswag_tasks, kernels, compute, candidates: tuple[CandidateRun, ...],
                           text: bool | None = None) -> ValidationInputs:
    """The gates (checked against the baseline report), the kernels' device, the evaluation
    windows (none when `data` is None) and the benchmark tasks: InputError on any before the
    evaluation starts (a recipe calls this before it quantizes, as its validation comes hours
    later). `text`: whether the run evaluates text (default: `data` is given; a recipe's
    self-written text exists only after quantizing)."""
    from maverick_quant.calibration.data import (check_ids_in_vocabulary, check_scored, eval_windows, load_tokenizer,
                                                 scored_from)
    from maverick_quant.devices import check_kernels_device
    from maverick_quant.arch.registry import table_for
    from maverick_quant.model_config import check_positions, load_model_config
    from maverick_quant.validation.gates import ReportShape, check_baseline, check_gate_keys, parse_gate

    check_kernels_device(kernels, compute)
    text = data is not None if text is None else text
    parsed = [parse_gate(text) for text in gates]
    config = load_model_config(Path(reference))
    if text:
        check_scored(protocol, ctx)
        check_positions(config, ctx, "--ctx", reference)
    moe = table_for(config, str(Path(reference) / "config.json")).has_moe(config)
    for run in candidates:  # one gate list for every candidate of a recipe
        if run.gguf and run.kernels:  # the report would record kernels that never ran
            raise InputError("--kernels runs a bundle's 4-bit weights on our kernels; a GGUF candidate runs in "
                             "llama.cpp: drop --kernels")
        check_gate_keys(parsed, ReportShape(text=text, gpu=compute.type == "cuda", hellaswag=bool(hellaswag),
                                            choices=bool(choices), moe=moe, gguf=run.gguf, kernels=run.kernels,
                                            vision=run.vision))
    baseline_report = _read_baseline(baseline) if baseline else None
    check_baseline(parsed, baseline_report)  # a missing key: before the windows are read
    if baseline and not any(gate.uses_baseline for gate in parsed):
        click.echo(f"note: no gate compares with `baseline` (e.g. kl.mean<=baseline*1.1): the baseline report "
                   f"{baseline} is not used")
    tokenizer = load_tokenizer(reference)
    windows = eval_windows(data, tokenizer, ctx, max_windows, protocol) if data is not None else None
    if windows is not None:
        check_ids_in_vocabulary(windows, config, f"--data {data}", reference,
                                "the reference's tokenizer holds ids its model has no embedding for")
    tasks = _read_benchmarks(hellaswag, choices, hellaswag_tasks, tokenizer, reference)
    facts = known_facts(reference, protocol, ctx, windows, tasks, text)
    unchecked = check_baseline(parsed, baseline_report, facts)
    if unchecked:
        click.echo(f"note: the baseline report {baseline} does not record {', '.join(unchecked)} (written by an older "
                   "version): whether its numbers were measured as this run's could not be checked on those")
    return ValidationInputs(parsed, baseline_report, tokenizer, windows, scored_from(protocol, ctx), tasks, facts)


def known_facts(reference: Path, protocol: str, ctx: int, windows: torch.Tensor | None, tasks: dict,
                text: bool = True) -> dict:
    """What a report records of what it measured on, known before any work (report-shaped, as
    gates.check_comparable reads it): the reference's fingerprint; the protocol and a sha256 of
    the evaluation windows [W, ctx] (with `text` but no windows yet, a recipe's self-written
    text, the protocol only; none without text); per benchmark, its task count and its file's
    sha256."""
    from maverick_quant.calibration.data import scored_from
    from maverick_quant.checkpoint import Checkpoint, sha256_file
    from maverick_quant.resume import tensor_sha256

    facts: dict = {"reference_fingerprint": Checkpoint(reference).fingerprint()}
    if text:
        facts["protocol"] = {"name": protocol, "ctx": ctx, "first_scored_position": scored_from(protocol, ctx)}
    if windows is not None:
        facts["protocol"].update(windows=int(windows.shape[0]), windows_sha256=tensor_sha256(windows))
    for name, (path, items) in tasks.items():
        facts[BENCHMARK_SECTION[name]] = {"tasks": len(items), "sha256": sha256_file(path)}
    return facts


def run_validate(reference, candidate, data, report_dir, ctx, max_windows, gates=(), baseline=None,
                 batch=4, force=False, progress=True, protocol="gptq", hellaswag=None, hellaswag_tasks=None,
                 choices=None, kernels=None, device="auto", choices_pass_mib=CHOICES_PASS_MIB, resume=False,
                 vision: VisionCheck | None = None, restart_changed: str | None = None) -> bool:
    """Shared by `validate`, `run` and `demo`; returns whether every gate passed. `kernels`: run a
    bundle candidate through that kernel backend (None: dequantize it); `device`: where the
    layers run (devices.py); `choices_pass_mib`: hidden states per pass of the multiple-choice
    benchmarks (MiB); `resume`: go on with an interrupted run of the same inputs; `vision`:
    also compare a GGUF candidate's image embeddings (its mmproj) with the reference's;
    `restart_changed`: under `resume`, start an unfinished run of other inputs over (`run
    --resume --force`; the text names the step in a note)."""
    from maverick_quant.checkpoint import require_exists, sha256_file
    from maverick_quant.outputs import check_output_apart, check_output_dir
    from maverick_quant.devices import reset_peak_memory, resolve_device, use_device
    from maverick_quant.exporters.artifact import recorded_bundle
    from maverick_quant.resume import resumable_output_dir
    from maverick_quant.streaming import open_source
    from maverick_quant.validation.evaluate import GGUFCandidate, open_candidate
    from maverick_quant.validation.progress import ValidationState, validation_identity

    check_output_dir(report_dir, force)
    check_output_apart(report_dir, {"--reference": reference, "--candidate": candidate, "--data": data,
                                    "--baseline": baseline, "--hellaswag": hellaswag, "--choices": choices,
                                    "--mmproj": vision.mmproj if vision else None,
                                    "--images": vision.images if vision else None}, "--report")
    require_exists(Path(candidate))
    compute = resolve_device(device)
    run = CandidateRun(gguf=Path(candidate).is_file(), kernels=kernels is not None, vision=vision is not None)
    inputs = read_validation_inputs(reference, data, ctx, max_windows, protocol, gates, baseline, hellaswag, choices,
                                    hellaswag_tasks, kernels, compute, (run,))
    tokenizer, windows, first, tasks = inputs.tokenizer, inputs.windows, inputs.first_scored, inputs.tasks
    if kernels == "auto":  # the report, and the identity a resumed run must match, name the backend that runs
        from maverick_quant.runtime import backend_named

        kernels = backend_named(kernels, compute).name
    use_device(compute)
    reset_peak_memory(compute)
    gguf = Path(candidate).is_file()
    ref_source = open_source(reference)
    ref_source.check_head()
    cand_source = (GGUFCandidate(Path(candidate), gpu_layers=-1 if compute.type == "cuda" else 0) if gguf
                   else open_candidate(candidate))
    if gguf:  # a file llama.cpp cannot load is refused here, not after the reference pass
        cand_source.check_loads(ref_source.table.text_config(ref_source.config).vocab_size)
    source_matches = _check_candidate_source(Path(candidate), ref_source, Path(reference))
    benchmarks = {name: {"file": str(path), "sha256": sha256_file(path)} for name, (path, _) in tasks.items()}
    benchmarks.update(tasks=hellaswag_tasks, pass_mib=choices_pass_mib)
    images, in_file, seen_inputs = _vision_inputs(vision, ref_source, gguf)  # a wrong mmproj or image: before any work
    identity = validation_identity(reference, candidate, windows, {"protocol": protocol, "ctx": ctx, "batch": batch,
                                                                   "kernels": kernels, "device": str(compute),
                                                                   **benchmarks, **seen_inputs})
    with resumable_output_dir(Path(report_dir), identity, force, resume, restart_changed=restart_changed) as (work, run_state):
        state = ValidationState(run_state.folder)
        seen = (_vision(state, ref_source, Path(candidate), vision.mmproj, images, in_file, compute, progress)
                if images else None)
        result = _evaluation(state, ref_source, cand_source, windows, batch, progress, first, kernels, compute, gguf)
        report = {**result.summary, "protocol": {**inputs.facts["protocol"], "data": str(data)},
                  "reference_model": str(reference), "reference_fingerprint": inputs.facts["reference_fingerprint"],
                  "candidate_model": str(candidate), "candidate_bundle_manifest_sha256": recorded_bundle(Path(candidate)),
                  "tool_version": __version__,
                  "kernels": kernels, "device": str(compute), "candidate_source_matches_reference": source_matches}
        report.update(_choice_benchmarks(state, ref_source, cand_source, tokenizer, tasks, kernels=kernels,
                                         progress=progress, device=compute, pass_mib=choices_pass_mib))
        report.update(_expert_summary(cand_source, result.summary.get("experts")))
        if seen is not None:  # measured first: minutes, where the evaluation takes hours
            report["vision"] = seen
        report["resources"] = _resources(compute)
        outcomes = _gate(inputs.gates, report, inputs.baseline, report_dir)
        _write(report, outcomes, result, work)
    _echo_summary(report, outcomes)
    return all(o.passed for o in outcomes)


def _check_candidate_source(candidate: Path, ref_source, reference: Path) -> bool | None:
    """Whether the model `candidate` records it was quantized from has the reference's
    fingerprint (None: it records none); a note when not: a candidate of another model of the
    same shapes validates without error, and its poor agreement would read as a bad quantization."""
    from maverick_quant.exporters.artifact import recorded_source_fingerprint

    recorded = recorded_source_fingerprint(candidate)
    if recorded is None:
        return None
    matches = recorded == ref_source.checkpoint.fingerprint()
    if not matches:
        click.echo(f"note: {candidate} records that it was quantized from another model than {reference} "
                   f"(source fingerprint {recorded[:12]}..., the reference's {ref_source.checkpoint.fingerprint()[:12]}...): "
                   "the comparison measures the difference between two models, not a quantization")
    return matches


def _evaluation(state, ref_source, cand_source, windows: torch.Tensor, batch: int, progress: bool, first: int,
                kernels: str | None, device, gguf: bool):
    """The perplexity / KL evaluation: kept in `state` once finished, and read back from it by a
    resumed run (whose unfinished evaluation goes on from its last finished layer)."""
    from maverick_quant.validation.evaluate import Evaluation, evaluate, evaluate_gguf

    saved = state.load_result("evaluation")
    if saved is not None:
        (record, tensors) = saved
        return Evaluation(record["summary"], tensors["kl_values"], [tuple(pair) for pair in record["layer_errors"]])
    if gguf:
        result = evaluate_gguf(ref_source, cand_source, windows, batch=batch, show_progress=progress, first_scored=first,
                               device=device, state=state)
    else:
        result = evaluate(ref_source, cand_source, windows, batch=batch, show_progress=progress, first_scored=first,
                          kernels=kernels, device=device, state=state)
    state.save_result("evaluation", {"summary": result.summary, "layer_errors": result.layer_errors},
                      {"kl_values": result.kl_values})
    return result


def _vision_inputs(vision: VisionCheck | None, ref_source, gguf: bool) -> tuple[list, dict | None, dict]:
    """(images made image_size square, the projector file's normalisation from check_mmproj,
    their part of the run identity) for `vision`, after checking the candidate, the file's
    geometry and the reference's vision tower and normalisation; ([], None, {}) without."""
    from maverick_quant.arch.llama4 import image_normalisation
    from maverick_quant.checkpoint import sha256_file
    from maverick_quant.validation.vision import check_mmproj, images_sha256, read_images, synthetic_images

    if vision is None:
        return [], None, {}
    if not gguf:
        raise InputError(f"--mmproj {vision.mmproj}: the candidate must be the GGUF file it goes with "
                         "(llama.cpp runs both)")
    config = ref_source.checkpoint.load_config()
    in_file = check_mmproj(vision.mmproj, config)
    image_normalisation(ref_source.checkpoint.model_dir)
    try:  # a missing client is refused here, not after the text evaluation
        import llama_cpp.mtmd_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # no module, or its shared library missing or unloadable
        raise InputError(f"--mmproj {vision.mmproj}: needs llama-cpp-python with its multimodal library "
                         "(llama_cpp.mtmd_cpp); install a release that has it") from None

    size = config.vision_config.image_size
    images = (synthetic_images(vision.count, size) if vision.images is None
              else read_images(vision.images, vision.count, size))
    return images, in_file, {"mmproj": sha256_file(vision.mmproj), "images_sha256": images_sha256(images)}


def _vision(state, ref_source, text_gguf: Path, mmproj: Path, images: list, in_file: dict, device,
            progress: bool) -> dict:
    """The report's `vision` section, kept in `state` once finished."""
    from maverick_quant.validation.vision import vision_agreement

    saved = state.load_result("vision")
    if saved is not None:
        return saved[0]
    result = vision_agreement(ref_source, text_gguf, mmproj, images, device, progress, in_file)
    state.save_result("vision", result)
    click.echo(f"vision: {result['images']} images of {result['tokens_per_image']} tokens, llama.cpp's image "
               f"embeddings vs the reference: relative error mean {result['rel_error']['mean']:.2e}, "
               f"max {result['rel_error']['max']:.2e}")
    return result


def _resources(device) -> dict:
    """The peak memory of this attempt (a resumed run's counts only its last attempt): the
    process's peak RSS, and on a GPU torch's peak allocation (`plan` predicts both)."""
    from maverick_quant.devices import peak_device_mib
    from maverick_quant.host_memory import peak_rss_mib

    return {"peak_rss_mib": peak_rss_mib(), "peak_gpu_mib": peak_device_mib(device)}


def _gate(parsed, report: dict, baseline_report: dict | None, report_dir) -> list:
    """The gates' outcomes, recorded in report["gates"]. A gate whose key is missing is bad
    input, but the finished evaluation is kept for `--resume` with corrected gates."""
    from maverick_quant.validation.gates import evaluate_gates

    try:
        outcomes = evaluate_gates(parsed, report, baseline_report)
    except InputError as exc:
        raise InputError(f"{exc}. The finished evaluation is kept: rerun with the gates corrected and --resume "
                         f"(report {report_dir})", keep_work=True) from None
    report["gates"] = [{"gate": o.gate, "actual": o.actual, "threshold": o.threshold, "passed": o.passed} for o in outcomes]
    return outcomes


def _write(report: dict, outcomes: list, result, out_dir: Path) -> None:
    """report.json, report.md and the plots into `out_dir`."""
    from maverick_quant.inspect_bundle import expert_token_counts
    from maverick_quant.validation.report import write_report

    write_report(report, out_dir, kl_values=result.kl_values, layer_errors=result.layer_errors, gate_results=outcomes,
                 expert_tokens=expert_token_counts(report.get("experts", {}).get("per_expert", [])))


def _expert_summary(candidate, measured: dict | None) -> dict:
    """The report's "experts": what validation `measured` per routed expert (evaluation tokens,
    rel_error; validation/experts.py) joined, for an MoE bundle, with its quantize audit
    (calibration tokens, policy, the largest relative loss of its linears, fallbacks)."""
    from maverick_quant.bundle import Bundle
    from maverick_quant.inspect_bundle import expert_audit

    summary = dict(measured or {})
    audit = expert_audit(candidate) if isinstance(candidate, Bundle) else []
    if audit:
        validated = {(row["layer"], row["expert"]): row for row in summary.get("per_expert", [])}
        rows = [{**validated.get((r["layer"], r["expert"]), {}), "layer": r["layer"], "expert": r["expert"],
                 "tokens": r["tokens"], "policy": r["policy"],
                 "rel_loss": max((l["rel_loss"] for l in r.get("linears", {}).values()), default=None)} for r in audit]
        summary.update(count=len(audit), fallbacks=sum("fallback" in r["reason"] for r in audit), per_expert=rows)
    return {"experts": summary} if summary else {}


def _read_benchmarks(hellaswag, choices, limit: int | None, tokenizer, reference) -> dict[str, tuple[Path, list]]:
    """{"hellaswag" / "choices": (file, its first `limit` tasks)} of the benchmarks asked for;
    InputError naming the file and line of a malformed task, an empty file, a task whose
    choices `tokenizer` gives no shared first token, or one too long for the `reference`
    model's packed rows (`check_packed_rows`): here, not after the evaluation."""
    from maverick_quant.streaming import open_source
    from maverick_quant.validation.hellaswag import check_packed_rows, encode_task, read_choice_jsonl, read_hellaswag

    readers = {"hellaswag": (hellaswag, read_hellaswag), "choices": (choices, read_choice_jsonl)}
    tasks = {name: (Path(path), read(path, limit)) for name, (path, read) in readers.items() if path}
    source = open_source(reference) if tasks else None  # headers only, opened once for every file
    for path, items in tasks.values():
        if limit is not None and len(items) < limit:
            click.echo(f"note: --hellaswag-tasks {limit}, but {path} holds {len(items)} tasks: all {len(items)} are scored")
        check_packed_rows([encode_task(task, tokenizer) for task in items], source, str(path))
    return tasks


def _choice_benchmarks(state, ref_source, cand_source, tokenizer, tasks: dict[str, tuple[Path, list]], kernels=None,
                       progress=True, device="cpu", pass_mib=CHOICES_PASS_MIB) -> dict:
    """HellaSwag (llama.cpp text layout) and/or a local multiple-choice JSONL (`tasks`, from
    `_read_benchmarks`): accuracy drift and wall time, layers on `device`, `pass_mib` of hidden
    states per pass over the weights; each kept in `state` once finished (a resumed run reads
    it back)."""
    from maverick_quant.checkpoint import sha256_file
    from maverick_quant.validation.hellaswag import evaluate_choices

    def drift(name: str) -> dict:
        saved = state.load_result(f"benchmark-{name}")
        if saved is not None:
            return saved[0]
        path, items = tasks[name]
        started = time.perf_counter()
        result = evaluate_choices(ref_source, cand_source, items, tokenizer, kernels=kernels, show_progress=progress,
                                  device=device, pass_mib=pass_mib)
        result = {**result, "file": str(path), "sha256": sha256_file(path), "seconds": time.perf_counter() - started}
        state.save_result(f"benchmark-{name}", result)
        return result

    out = {BENCHMARK_SECTION[name]: drift(name) for name in ("hellaswag", "choices") if name in tasks}
    if "hellaswag" in out:
        click.echo(f"hellaswag ({out['hellaswag']['tasks']} tasks): reference {out['hellaswag']['reference']['acc']:.2f}%  "
                   f"candidate {out['hellaswag']['candidate']['acc']:.2f}%  delta {out['hellaswag']['delta']:+.2f} "
                   f"+- {out['hellaswag']['delta_ci95']:.2f} pp")
    return out


def _read_baseline(path: Path) -> dict:
    from maverick_quant.checkpoint import load_json_object

    return load_json_object(path, "baseline report")


def _echo_summary(report: dict, outcomes) -> None:
    click.echo(f"perplexity: reference {report['reference']['ppl']:.3f}  candidate {report['candidate']['ppl']:.3f}  "
               f"ratio {report['ppl_ratio']:.4f}")
    click.echo(f"KL mean {report['kl']['mean']:.5f}  p99 {report['kl']['p99']:.5f}  "
               f"top-1 agreement {report['top1_agreement']:.4f}  ({report['tokens']} tokens)")
    for outcome in outcomes:
        click.echo(f"gate {outcome.gate}: {'PASS' if outcome.passed else 'FAIL'} (actual {outcome.actual:.6g})")
