"""`maverick-quant run RECIPE`: the whole job from a recipe file into one directory
(calibrate -> quantize -> exports -> validation of each candidate), and its lock file:
`recipe.lock.yaml` is the recipe resolved plus a `lock:` section, which `check_lock_*` hold a
re-run to (same model, calibration and validation data)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from maverick_quant import __version__
from maverick_quant.errors import InputError
from maverick_quant.distributed import writes_outputs
from maverick_quant.jobs import _recipe_model_dir, run_export, run_export_gguf, run_quantize
from maverick_quant.validate_job import VisionCheck, run_validate
from maverick_quant.recipe import Method
from maverick_quant.recipe_file import VALIDATION_FILES


def run_recipe(recipe_path: Path, out: Path, force: bool = False, progress: bool = True, resume: bool = False,
               device: str | None = None) -> bool:
    """`maverick-quant run RECIPE`: calibrate -> quantize -> export(s) -> validate into `out`,
    then `recipe.lock.yaml`; returns whether every validation gate passed (True without one).
    With `resume`, an interrupted quantize goes on from its last finished layer, a bundle
    finished earlier with the same inputs is kept, and an interrupted validation goes on from
    its last finished layer; the other steps are redone. `device`
    (default: the recipe's quantize.device) is where the quantize step computes."""
    from maverick_quant.calibration.data import make_calibration
    from maverick_quant.outputs import atomic_output_dir, check_output_apart, check_output_dir
    from maverick_quant.devices import resolve_device
    from maverick_quant.recipe_file import load_recipe
    from maverick_quant.streaming import open_source

    recipe = load_recipe(recipe_path)
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out {out}: a file; a run writes a directory")
    if not resume:
        check_output_dir(out, force, replaced_whole=False)  # only the steps' outputs inside it are replaced
    elif Path(out).is_dir() and not force and not holds_a_run(Path(out)):
        raise InputError(f"--out {out} --resume: the folder holds no earlier run (no recipe.lock.yaml, bundle or "
                         "unfinished bundle) to go on with, and its contents would be replaced; name a new folder, "
                         "or pass --force to replace them")
    device = str(resolve_device(device or recipe.device, "--device" if device else "quantize.device"))
    model_dir, out = _recipe_model_dir(recipe.model), Path(out)
    if out.resolve() == model_dir.resolve():
        raise InputError(f"--out {out}: the model folder itself; a run writes its bundle, exports and reports into "
                         "their own folder")
    for replaced in recipe_outputs(recipe, out):  # `out` itself is never replaced, only these
        check_output_apart(replaced, recipe_inputs(recipe, model_dir))
    source = open_source(model_dir)  # a bad model is refused here, before any work
    _check_before_work(recipe, model_dir, source, device)
    steps = 2 + len(recipe.exports) + (len(recipe.validation.candidates) if recipe.validation is not None else 0)
    step = _step_printer(steps)
    calibration = None
    if recipe.quantize.method is not Method.RTN:
        step(f"calibrate: {recipe.calibration.samples} x {recipe.calibration.seq_len} tokens from {recipe.calibration_data}")
        calibration = make_calibration(model_dir, recipe.calibration_data, recipe.calibration)
        check_lock_calibration(recipe, calibration)
    else:
        step("calibrate: not needed for rtn")
    keep_bundle = resume and _keep_finished_bundle(out / "bundle", source, recipe.quantize, calibration, force)
    out.mkdir(parents=True, exist_ok=True)  # only now: bad input leaves no directory behind
    if writes_outputs():
        _start_over_the_lock(recipe, Path(recipe_path), out)
    step(f"quantize: {recipe.quantize.method.value}, {recipe.quantize.weights.bits} bits, group {recipe.quantize.weights.group_size}")
    if keep_bundle:
        click.echo(f"  {out / 'bundle'} was finished earlier with this recipe and model: kept")
    else:
        run_quantize(model_dir, out / "bundle", recipe.quantize, None, None, recipe.calibration, True, progress,
                     resume, device, drawn=calibration)
    if not writes_outputs():  # under torchrun the other ranks shared the experts; rank 0 alone goes on
        return True
    if calibration is not None:  # saved once the bundle stands on it (a refused --resume leaves the old set)
        with atomic_output_dir(out / "calibration", force=True) as tmp:
            calibration.save(tmp)
    for export in recipe.exports:
        step(f"export: {export.format} -> {export.name}")
        if export.format == "gguf":
            run_export_gguf(out / "bundle", out / export.name, export.gguf_type, export.requantize, export.gguf_pre,
                            force=True, progress=progress, mmproj=export.mmproj_name and out / export.mmproj_name,
                            mmproj_type=export.mmproj or "F16")
        else:
            run_export(out / "bundle", out / export.name, export.format, export.max_shard_size, force=True,
                       progress=progress)
    passed = True
    if recipe.validation is not None:
        v = recipe.validation
        data = v.data
        if data == "self":  # held-out text the model writes itself (another seed than calibration)
            from maverick_quant.demo import write_eval_text

            data = write_eval_text(model_dir, out / "eval-self.txt", v.max_windows or 16, v.ctx,  # ~ a window each
                                   recipe.calibration.seed if recipe.calibration_data == "self" else None)
        for candidate in v.candidates:
            vision = _vision_check(recipe, out, candidate)
            step(f"validate {candidate} on {v.data}" + (" (in llama.cpp)" if candidate.endswith(".gguf") else "")
                 + (f" with {vision.mmproj.name}" if vision else ""))
            passed &= run_validate(model_dir, out / candidate, data, out / report_name(candidate), v.ctx, v.max_windows,
                                   v.gates, v.baseline, v.batch, True, progress, v.protocol, v.hellaswag, v.hellaswag_tasks,
                                   v.choices, v.kernels if candidate == "bundle" else None, device, v.choices_pass_mib,
                                   resume, vision=vision,
                                   restart_changed=f"the validation of {candidate}" if force else None)
    _write_lock(recipe, device, Path(recipe_path), source, calibration, out / "recipe.lock.yaml")
    click.echo(f"run finished -> {out} ({'gates passed' if passed else 'a gate FAILED'})")
    return passed


def _start_over_the_lock(recipe, recipe_path: Path, out: Path) -> None:
    """Remove the lock file of an earlier run in `out` (this run writes its own when it ends: a
    run that fails midway must not leave a lock describing another recipe beside its outputs),
    unless it is the recipe being run, and the reports this recipe writes (an earlier run's
    passing gates must not stand beside a bundle they never measured, if this run fails before
    its validation); name what `out` holds that this recipe does not make (kept, from an
    earlier run)."""
    import shutil

    lock = out / "recipe.lock.yaml"
    if lock.exists() and lock.resolve() != Path(recipe_path).resolve():
        lock.unlink()
    for report in (out / report_name(c) for c in (recipe.validation.candidates if recipe.validation else ())):
        if (report / "report.json").is_file():
            shutil.rmtree(report)
    made = {path.name for path in recipe_outputs(recipe, out)} | {"recipe.lock.yaml"}
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in made and not entry.name.startswith("."))
    if foreign:
        click.echo(f"note: {out} also holds {', '.join(foreign)}, which this recipe does not make (left as they are)")


def _keep_finished_bundle(bundle_dir: Path, source, spec, calibration, force: bool) -> bool:
    """Under --resume: whether `bundle_dir` is a finished bundle whose run identity (source
    fingerprint, quantize spec, calibration tokens, tool version) equals this run's, to keep.
    One made from other inputs is InputError unless `force` (then it is made again), as
    `quantize` refuses an existing output; checked before the run writes anything."""
    from maverick_quant.bundle import MANIFEST
    from maverick_quant.resume import identity_changes, run_identity

    if not (bundle_dir / MANIFEST).is_file():
        return False
    try:
        recorded = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8")).get("run_identity") or {}
    except (UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise InputError(f"{bundle_dir / MANIFEST}: damaged ({exc}); pass --force to make the bundle again") from None
    current = run_identity(source.checkpoint.fingerprint(), spec.to_dict(),
                           None if calibration is None else calibration.input_ids)
    changes = identity_changes(recorded, current) if recorded else ["no run identity recorded"]
    if changes and not force:
        raise InputError(f"{bundle_dir}: --resume keeps a bundle of this recipe and model, but it was made with other "
                         f"inputs ({'; '.join(changes)}); pass --force to replace it")
    return not changes


def holds_a_run(out: Path) -> bool:
    """Whether the folder `out` holds what a `run` leaves: its lock, a bundle, or an unfinished
    bundle's work and state."""
    from maverick_quant.resume import state_dir_for, work_dir_for

    bundle = out / "bundle"
    return any(path.exists() for path in (out / "recipe.lock.yaml", bundle / "manifest.json", work_dir_for(bundle),
                                          state_dir_for(bundle)))


def recipe_outputs(recipe, out: Path) -> list[Path]:
    """What a run replaces inside its output folder `out`: calibration, bundle, exports (a GGUF
    with its card and manifest, and projector files), reports, self-written evaluation text."""
    from maverick_quant.exporters.artifact import gguf_sidecars

    exports = [out / name for export in recipe.exports for name in (export.name, export.mmproj_name) if name]
    exports += [sidecar for path in exports if path.suffix == ".gguf" for sidecar in gguf_sidecars(path)]
    reports = [out / report_name(candidate) for candidate in (recipe.validation.candidates if recipe.validation else ())]
    calibration = [out / "calibration"] if recipe.quantize.method is not Method.RTN else []
    self_text = [out / "eval-self.txt"] if recipe.validation is not None and recipe.validation.data == "self" else []
    return [*calibration, out / "bundle", *self_text, *exports, *reports]


def _check_before_work(recipe, model_dir: Path, source, device: str) -> None:
    """What later steps would refuse, checked before calibrating: the files, the exports'
    limits, overrides matching routed experts, the validation inputs, a lock's model and
    validation files."""
    from maverick_quant.pipeline import refuse_overridden_experts, refuse_unblockable_widths

    _check_recipe_files(recipe, model_dir)
    _check_mmproj_exports(recipe, model_dir, source)
    _check_gguf_exports(recipe, model_dir, source)
    refuse_overridden_experts(source, recipe.quantize)
    refuse_unblockable_widths(source, recipe.quantize)
    _check_packed_exports(recipe, source)
    _check_validation(recipe, model_dir, device)
    _check_kernel_grids(recipe, source)
    check_lock_inputs(recipe, source)


def recipe_inputs(recipe, model_dir: Path) -> dict[str, str | Path | None]:
    """{recipe key: path} of what the recipe reads: the model and its data files."""
    named = {"model": model_dir, "calibration.data": recipe.calibration_data}
    if recipe.validation is not None:
        named.update({f"validation.{key}": getattr(recipe.validation, key) for key in VALIDATION_FILES})
    return named


def _check_recipe_files(recipe, model_dir: Path) -> None:
    """Every file the recipe names exists, and `self` data (text the model writes, in fp32)
    fits this machine's memory, before any work: validation's comes after hours of quantizing."""
    from maverick_quant.calibration.selfgen import check_fits_in_memory

    named = {key: path for key, path in recipe_inputs(recipe, model_dir).items() if key != "model"}
    for key, path in named.items():
        if path not in (None, "self") and not Path(path).is_file():
            raise InputError(f"{key}: {path} is not a file")
    if "self" in named.values():
        check_fits_in_memory(model_dir)


def _check_gguf_exports(recipe, model_dir: Path, source) -> None:
    """What a gguf export refuses about the model (llama.cpp's limits on Llama 4, its rope, the
    pre-tokenizer, widths not a multiple of 32), checked on the float model's headers before any
    work; whether the bundle's grid fits the type is checked when the recipe is read."""
    from maverick_quant.exporters.gguf import plan_gguf_export
    from maverick_quant.exporters.gguf_weights import FloatWeights

    for export in recipe.exports:
        if export.format == "gguf":
            plan_gguf_export(FloatWeights(model_dir, source), export.gguf_type, True, export.gguf_pre)


def _check_packed_exports(recipe, source) -> None:
    """What a gptq / awq / compressed-tensors export would refuse about the recipe on this model,
    before any work: its grid (for an MoE model, the grids vLLM's expert kernels take), groups
    that tile K where the layout needs them to, and
    keep_float / bits_overrides that treat siblings vLLM fuses (q/k/v, gate/up) differently."""
    import dataclasses

    from maverick_quant.exporters.packed import refuse_split_fused_sets
    from maverick_quant.exporters.registry import LAYOUTS
    from maverick_quant.pipeline import refuse_untiled_groups

    packed = [export for export in recipe.exports if export.format in LAYOUTS]
    if not packed:
        return
    text, spec = source.text_config, recipe.quantize
    plans = [source.table.plan(text, index) for index in range(text.num_hidden_layers)]
    grid = spec.to_dict()["weights"]
    for export in packed:
        if problem := LAYOUTS[export.format].check(grid, source.table.has_moe(source.config)):
            raise InputError(f"exports: format {export.format}: {problem}")
        if LAYOUTS[export.format].groups_tile_k:
            refuse_untiled_groups(source, spec, export.format)
    for index, plan in enumerate(plans):
        prefix = source.table.prefix(index)
        treatments = {name: "float" if spec.keeps_float(prefix + name) else dataclasses.asdict(spec.weights_for(prefix + name))
                      for name in plan.linears}
        try:
            refuse_split_fused_sets(prefix, treatments)
        except InputError as exc:
            raise InputError(f"exports: format {packed[0].format}: {exc}") from None


def _check_kernel_grids(recipe, source) -> None:
    """With `validation.kernels` on the bundle: every linear the run quantizes on its grid must be
    one the 4-bit kernels run (`check_kernel_grid`, as `quantize` notes afterwards); it was found
    at the validation step, after the whole quantize. Bits-override linears run as float."""
    from maverick_quant.jobs import kernel_grid_problems
    from maverick_quant.pipeline import quantized_widths

    v = recipe.validation
    if v is None or v.kernels is None or "bundle" not in v.candidates:
        return
    widths = quantized_widths(source.table, source.text_config, recipe.quantize)
    linears = ((name, width, dataclasses.asdict(grid)) for name, width, grid in widths)
    if problems := kernel_grid_problems(linears, recipe.quantize.weights.bits):
        raise InputError(f"validation.kernels {v.kernels}: {problems[0]}; validate the bundle without kernels (drop "
                         "validation.kernels), or quantize on a grid they run")


def _check_validation(recipe, model_dir: Path, device: str) -> None:
    """The validation step's gates (and baseline), kernels' device, evaluation windows and
    benchmark files, read and checked before any work: the step itself comes hours later."""
    from maverick_quant.devices import resolve_device
    from maverick_quant.validate_job import CandidateRun, read_validation_inputs
    from maverick_quant.validation.evaluate import import_llama_cpp

    v = recipe.validation
    if v is None:
        return
    data = None if v.data == "self" else v.data  # self-written evaluation text exists only after quantizing
    kernels = v.kernels if "bundle" in v.candidates else None
    with_mmproj = {export.name for export in recipe.exports if export.mmproj}
    runs = tuple(CandidateRun(gguf=name.endswith(".gguf"), kernels=name == "bundle" and kernels is not None,
                              vision=name in with_mmproj) for name in v.candidates)
    read_validation_inputs(model_dir, data, v.ctx, v.max_windows, v.protocol, v.gates, v.baseline, v.hellaswag,
                           v.choices, v.hellaswag_tasks, kernels, resolve_device(device), runs, text=True)
    for candidate in v.candidates:
        if candidate.endswith(".gguf"):
            import_llama_cpp(Path(candidate))


def _check_mmproj_exports(recipe, model_dir: Path, source) -> None:
    """An `exports[].mmproj` step's vision tower is checked against llama.cpp's projector before
    any work (config, tensor names and shapes, image normalisation: nothing is read but headers)."""
    from maverick_quant.exporters.gguf_weights import FloatWeights
    from maverick_quant.exporters.gguf_mmproj import MMProjPlan

    for export in recipe.exports:
        if export.mmproj:
            MMProjPlan(FloatWeights(model_dir, source), export.mmproj)


def _vision_check(recipe, out: Path, candidate: str) -> VisionCheck | None:
    """A GGUF candidate whose export step wrote an mmproj is validated with it."""
    written = {e.name: out / e.mmproj_name for e in recipe.exports if e.mmproj}
    return VisionCheck(written[candidate]) if candidate in written else None


def report_name(candidate: str) -> str:
    """A run's report directory for a validation candidate: report/ for the bundle,
    report-model-q4_0.gguf/ for an export."""
    return "report" if candidate == "bundle" else f"report-{candidate}"


def _step_printer(total: int):
    count = iter(range(1, total + 1))
    return lambda text: click.echo(f"[{next(count)}/{total}] {text}")


def _write_lock(recipe, device: str, recipe_path: Path, source, calibration, path: Path) -> None:
    """recipe.lock.yaml: the recipe with every value resolved (but `quantize.device` as written,
    so the lock runs on another machine), and under `lock:` the device that ran, the model's
    fingerprint, the calibration records' and windows' sha256, every validation file's sha256,
    the recipe file, and library versions. `maverick-quant run recipe.lock.yaml` runs it again,
    after `check_lock_inputs` and `check_lock_calibration` find the same model and data."""
    import importlib.metadata
    import platform

    import yaml

    from maverick_quant.checkpoint import sha256_file
    from maverick_quant.outputs import write_text_atomic

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    provenance = {"model_fingerprint": source.checkpoint.fingerprint(), "device": device, **_calibration_hashes(calibration),
                  "validation_sha256": _validation_hashes(recipe),
                  "recipe_file": {"path": str(recipe_path.absolute()), "sha256": sha256_file(recipe_path)},
                  "versions": {"python": platform.python_version(), "maverick-quant": __version__,
                               **{p: version(p) for p in ("torch", "transformers", "safetensors", "gguf",
                                                          "compressed-tensors", "numpy", "triton")}}}
    lock = dataclasses.replace(recipe, lock=provenance).to_dict()
    write_text_atomic(path, yaml.safe_dump(lock, sort_keys=False))


def _calibration_hashes(calibration) -> dict:
    """sha256 of the calibration records and of the drawn windows (none for RTN)."""
    if calibration is None:
        return {}
    return {"calibration_data_sha256": calibration.meta.get("data_sha256"),
            "calibration_windows_sha256": calibration.meta.get("windows_sha256")}


def _validation_hashes(recipe) -> dict:
    """{key: sha256} of the validation files the recipe names (not `self`)."""
    from maverick_quant.checkpoint import sha256_file

    if recipe.validation is None:
        return {}
    files = {key: getattr(recipe.validation, key) for key in VALIDATION_FILES}
    return {key: sha256_file(Path(value)) for key, value in files.items() if value not in (None, "self")}


LOCKED_INPUTS = {"model_fingerprint": "the model", "validation_sha256": "that validation file",
                 "calibration_data_sha256": "the calibration text", "calibration_windows_sha256": "the calibration windows"}


def check_lock_inputs(recipe, source) -> None:
    """A lock file's recipe runs only on what it was written from: InputError naming the model
    or validation file that changed, before any work. A recipe without `lock:` passes."""
    locked = (recipe.lock or {}).get("model_fingerprint")
    current = source.checkpoint.fingerprint()
    if locked not in (None, current) and locked == source.checkpoint.fingerprint(sample_bytes=0):
        raise InputError(f"lock.model_fingerprint: written before 2026-12-07, when the fingerprint covered config.json "
                         f"and the shard headers only, which match this model; its fingerprint is now {current} "
                         "(put that in the lock, or remove the `lock:` section)")
    _compare_with_lock(recipe, {"model_fingerprint": current,
                                **{f"validation_sha256.{key}": value for key, value in _validation_hashes(recipe).items()}})


def check_lock_calibration(recipe, calibration) -> None:
    """`check_lock_inputs` for the calibration records and the windows drawn from them, as
    soon as they are drawn (before quantizing)."""
    _compare_with_lock(recipe, _calibration_hashes(calibration))


def _compare_with_lock(recipe, found: dict[str, str]) -> None:
    """InputError for the first of `found` ({key or "section.key": hash}) that differs from the
    recipe's `lock:` section (keys the lock does not record pass)."""
    if recipe.lock is None:
        return
    for key, value in found.items():
        section, _, name = key.partition(".")
        expected = recipe.lock.get(section)
        expected = expected.get(name) if name and isinstance(expected, dict) else expected
        if expected is not None and value != expected:
            locked_by = (recipe.lock.get("versions") or {}).get("maverick-quant")
            tool = (f"; or maverick-quant {__version__}, which wrote no lock of it ({locked_by} did), reads or draws them "
                    "otherwise" if locked_by not in (None, __version__) else "")
            raise InputError(f"lock.{key}: the lock file was written from {expected}, this run finds {value}: "
                             f"{LOCKED_INPUTS[section]} changed since{tool} (remove the `lock:` section to run it "
                             "anyway)")
