"""YAML recipes: the whole job in one file, validated on load, and the resolved lock file.

    model: path/to/model | builtin:smollm2-135m-instruct
    calibration: {data: FILE | self, samples: 128, seq_len: 512, seed: 0, chat_template: false, windows: random, bos: true}
    quantize:
      method: gptq            # rtn | gptq | awq | awq+gptq
      bits: 4
      group_size: 128
      sym: true
      gguf_grid: Q4_0         # optional: solve on exactly this llama.cpp type's grid
      device: auto            # auto | cpu | cuda | cuda:N: where layers and solves run (not part of the result's identity)
      moe: {policy: routed, min_tokens: 128, fallback: mixed, chunk_mib: 8192}
      awq: {grid: 20, clip: true}
    exports:
      - {format: gptq}        # gptq | awq | compressed-tensors | gguf (with gguf_type)
      - {format: gguf, gguf_type: Q4_0, mmproj: F16}   # mmproj: a Llama 4's vision tower for llama.cpp
    validation:
      data: wiki.test.raw     # or self: held-out text the model writes itself
      ctx: 512
      max_windows: 40
      protocol: gptq          # gptq | llama.cpp
      hellaswag: hellaswag_val_full.txt
      hellaswag_tasks: 1000
      gates: ["ppl_ratio<=1.05", "top1_agreement>=0.9"]

Every section maps onto a frozen dataclass. An unknown key, a value of the wrong type, or
an impossible value (bits 9, a group size no format stores) is refused with `InputError`
naming the key and the allowed values, before any work (the generic checks are in
recipe_schema.py). Relative paths are relative to the recipe file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maverick_quant.compress.pack import PACK_BITS
from maverick_quant.devices import check_device_name
from maverick_quant.errors import InputError
from maverick_quant.recipe import (CHOICES_PASS_MIB, GGUF_GRIDS, KERNEL_BACKENDS, MMPROJ_TYPES, AWQSpec, CalibSpec, Method, MoESpec, QuantizeSpec, QuantSpec,
                                   parse_bits_override, settings_unread_by)
from maverick_quant.recipe_schema import (field_types, one_of, plain, prefixed, refuse_repeats, section,
                                           unique_keys_loader)

BUILTIN_MODELS = {"builtin:smollm2-135m-instruct"}
EXPORT_FORMATS = ("gptq", "awq", "compressed-tensors", "gguf")
FROM_GGUF_GRID = ("scale_bits", "k_quant", "free_min")  # QuantSpec fields only a gguf_grid sets
GGUF_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0")
PROTOCOLS = ("gptq", "llama.cpp")


@dataclass(frozen=True)
class ExportStep:
    """One export of the bundle: `format`, and for GGUF its type, whether re-quantizing is
    allowed, the type of a Llama 4's vision projector file written beside it (`mmproj`) and
    llama.cpp's pre-tokenizer name where it is not recognised from tokenizer.json (`gguf_pre`,
    as `export --gguf-pre`)."""

    format: str
    gguf_type: str = "Q4_0"
    requantize: bool = False
    max_shard_size: int = 5 * 10**9
    mmproj: str | None = None
    gguf_pre: str | None = None

    def __post_init__(self) -> None:
        one_of("exports[].format", self.format, EXPORT_FORMATS)
        one_of("exports[].gguf_type", self.gguf_type, GGUF_TYPES)
        if self.mmproj is not None:
            one_of("exports[].mmproj", self.mmproj, MMPROJ_TYPES)
            if self.format != "gguf":
                raise InputError(f"exports[].mmproj: only a gguf export writes llama.cpp's projector file "
                                 f"(format {self.format} keeps the vision tower in the checkpoint)")
        if self.max_shard_size < 1:
            raise InputError(f"exports[].max_shard_size={self.max_shard_size}: expected a positive number of bytes")
        if self.gguf_pre is not None and self.format != "gguf":
            raise InputError(f"exports[].gguf_pre: a pre-tokenizer name is for a gguf export, not {self.format}")
        if self.format != "gguf" and self.gguf_type != ExportStep.gguf_type:
            raise InputError(f"exports[].gguf_type={self.gguf_type}: only a gguf export has a type; format {self.format} "
                             "stores the bundle's grid")
        if self.format == "gguf" and self.max_shard_size != ExportStep.max_shard_size:
            raise InputError("exports[].max_shard_size: a gguf export is written as one file; the shard size is for "
                             "gptq, awq and compressed-tensors exports")
        if self.requantize and self.format != "gguf":
            raise InputError(f"exports[].requantize: only a gguf export re-quantizes (to its gguf_type); format "
                             f"{self.format} stores the bundle's grid as it is")

    @property
    def name(self) -> str:
        """Output name inside the run directory: model-gptq/, model-q4_0.gguf."""
        return f"model-{self.gguf_type.lower()}.gguf" if self.format == "gguf" else f"model-{self.format}"

    @property
    def mmproj_name(self) -> str | None:
        """The projector file beside a GGUF export: mmproj-f16.gguf (None without `mmproj`)."""
        return f"mmproj-{self.mmproj.lower()}.gguf" if self.mmproj else None


VALIDATION_FILES = ("data", "hellaswag", "choices", "baseline")  # validation keys that name files


@dataclass(frozen=True)
class ValidationStep:
    """`validate` of each candidate (the bundle, and exports named by their output name: a GGUF
    runs in llama.cpp) against the original model (see `maverick-quant validate`)."""

    data: str
    ctx: int = 512
    max_windows: int = 40
    protocol: str = "gptq"
    batch: int = 4
    hellaswag: str | None = None
    hellaswag_tasks: int | None = None
    choices: str | None = None
    choices_pass_mib: int = CHOICES_PASS_MIB
    kernels: str | None = None
    gates: tuple[str, ...] = ()
    baseline: str | None = None  # an earlier report.json, for gates that compare with `baseline`
    candidates: tuple[str, ...] = ("bundle",)  # "bundle" and/or exports by output name (model-q4_0.gguf, model-gptq)

    def __post_init__(self) -> None:
        one_of("validation.protocol", self.protocol, PROTOCOLS)
        if not self.candidates:
            raise InputError("validation.candidates: empty; expected bundle and/or the name of an export")
        if self.kernels is not None:
            one_of("validation.kernels", self.kernels, KERNEL_BACKENDS)
        for key in ("ctx", "max_windows", "batch", "choices_pass_mib", "hellaswag_tasks"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise InputError(f"validation.{key}={getattr(self, key)}: expected a positive integer")
        from maverick_quant.calibration.data import check_scored

        check_scored(self.protocol, self.ctx, "validation.ctx")
        if self.hellaswag_tasks is not None and self.hellaswag is None and self.choices is None:
            raise InputError("validation.hellaswag_tasks: given without validation.hellaswag or validation.choices, "
                             "the benchmark file it limits")
        if self.choices_pass_mib != CHOICES_PASS_MIB and self.hellaswag is None and self.choices is None:
            raise InputError("validation.choices_pass_mib: given without validation.hellaswag or validation.choices, "
                             "the benchmarks whose passes it sizes")
        if self.kernels is not None and "bundle" not in self.candidates:
            raise InputError("validation.kernels: runs the bundle on the 4-bit kernels, and bundle is not among "
                             "validation.candidates")
        from maverick_quant.validation.gates import parse_gate

        for gate in self.gates:
            parse_gate(gate)


@dataclass(frozen=True)
class Recipe:
    """A whole job: model, calibration, quantization, exports and validation."""

    model: str
    calibration_data: str | None = None
    calibration: CalibSpec = CalibSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    exports: tuple[ExportStep, ...] = ()
    validation: ValidationStep | None = None
    gguf_grid: str | None = None
    device: str = "auto"
    lock: dict | None = dataclasses.field(default=None, hash=False)  # a lock file's provenance (LOCK_KEYS)

    def __post_init__(self) -> None:
        if self.quantize.method is not Method.RTN and self.calibration_data is None:
            raise InputError(f"calibration.data: method {self.quantize.method.value} needs calibration data (a file or 'self')")
        for step in self.exports:
            _check_export_grid(step, self.quantize.weights)
            _check_export_overrides(step, self.quantize)
        names = ["bundle", *(step.name for step in self.exports)]
        refuse_repeats("exports[]", names[1:], "two exports would write the same output")
        if self.validation is not None:
            for candidate in self.validation.candidates:
                one_of("validation.candidates[]", candidate, tuple(names))
            refuse_repeats("validation.candidates[]", list(self.validation.candidates), "it would be validated twice")

    def to_dict(self) -> dict:
        """Every value resolved (defaults included), in the recipe's own structure and YAML-friendly:
        `parse_recipe(recipe.to_dict())` is this recipe again, so a lock file runs as a recipe."""
        spec = self.quantize.to_dict()
        weights = {key: value for key, value in spec.pop("weights").items() if key not in FROM_GGUF_GRID}
        recipe = {"model": self.model,
                  "calibration": {"data": self.calibration_data, **dataclasses.asdict(self.calibration)},
                  "quantize": {**spec, **weights, "gguf_grid": self.gguf_grid, "device": self.device},
                  "exports": [dataclasses.asdict(step) for step in self.exports],
                  "validation": None if self.validation is None else dataclasses.asdict(self.validation)}
        if self.lock is not None:
            recipe["lock"] = self.lock
        return plain(_drop_unread(recipe, self.quantize.method))


EXPORT_BITS = {"gptq": PACK_BITS, "compressed-tensors": PACK_BITS, "awq": (4,)}  # AWQ's layout is 4-bit only


def _check_export_grid(step: ExportStep, weights: QuantSpec) -> None:
    """Refuse, before hours of work, an export that cannot store the bundle's grid."""
    if step.format in EXPORT_BITS and weights.bits not in EXPORT_BITS[step.format]:
        raise InputError(f"exports: format {step.format} stores bits {EXPORT_BITS[step.format]}, "
                         f"quantize.bits is {weights.bits}")
    if weights.gguf_grid and step.format != "gguf":
        raise InputError(f"exports: format {step.format} cannot store quantize.gguf_grid {weights.gguf_grid}'s offset "
                         f"grid; only gguf_type {weights.gguf_grid} does (drop gguf_grid to export {step.format})")
    if step.format == "gguf" and not step.requantize:  # the exporter's own test: what it stores losslessly
        from maverick_quant.compress.gguf_blocks import BLOCK_TYPES, grid_mismatch

        grid = {key: getattr(weights, key) for key in ("bits", "group_size", "sym", "scale_bits", "k_quant", "free_min")}
        why = grid_mismatch(grid, BLOCK_TYPES[step.gguf_type])
        if why:
            raise InputError(f"exports: gguf_type {step.gguf_type} cannot store the bundle's grid losslessly ({why}); "
                             f"set quantize.gguf_grid: {step.gguf_type}, or requantize: true on the export")


OVERRIDE_BITS = {**EXPORT_BITS, "awq": (), "gguf": (4, 8)}  # widths each export stores beside the bundle's


def _check_export_overrides(step: ExportStep, quantize: QuantizeSpec) -> None:
    """Refuse, before any work, an export that cannot store a bits override's width (AWQ has one
    grid per checkpoint; GGUF stores other widths as Q4_0/Q4_1 or Q8_0)."""
    for entry in quantize.bits_overrides:
        bits = parse_bits_override(entry)[1]
        if bits != quantize.weights.bits and bits not in OVERRIDE_BITS[step.format]:
            stored = OVERRIDE_BITS[step.format] or "no other width"
            raise InputError(f"exports: format {step.format} stores {stored} beside the bundle's grid; "
                             f"quantize.bits_overrides entry {entry!r} asks for {bits} bits")


def _quantize(data: Any) -> tuple[QuantizeSpec, str | None, str]:
    """(spec, gguf_grid, device) of the `quantize:` section."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise InputError(f"quantize: expected a mapping, got {type(data).__name__}")
    nested = ("gguf_grid", "device", "moe", "awq")
    for name in data:
        if name not in QUANTIZE_KEYS and name not in nested:
            raise InputError(f"quantize.{name}: unknown key; expected one of {', '.join([*QUANTIZE_KEYS, *nested])}")
    top = section("quantize", {k: v for k, v in data.items() if k not in nested}, QUANTIZE_KEYS)
    grid = data.get("gguf_grid")
    if grid is not None:
        one_of("quantize.gguf_grid", grid, tuple(sorted(GGUF_GRIDS)))
    weights = {k: top.pop(k) for k in list(top) if k in {f.name for f in dataclasses.fields(QuantSpec)}}
    for key, value in GGUF_GRIDS.get(grid, {}).items():
        if key in weights and weights[key] != value:
            raise InputError(f"quantize.{key}={weights[key]!r}: quantize.gguf_grid {grid} sets {key} to {value!r} "
                             f"(drop the key, or drop gguf_grid)")
        weights[key] = value
    moe_keys = section("quantize.moe", data.get("moe"), MoESpec)
    awq_keys = section("quantize.awq", data.get("awq"), AWQSpec)
    device = check_device_name(data.get("device", "auto"), "quantize.device")
    with prefixed("quantize."):
        return QuantizeSpec(weights=QuantSpec(**weights), moe=MoESpec(**moe_keys), awq=AWQSpec(**awq_keys), **top), grid, device


# `quantize:` takes QuantizeSpec's own keys and QuantSpec's but FROM_GGUF_GRID's (set by a gguf_grid, or left at their defaults)
QUANTIZE_KEYS = {**field_types(QuantizeSpec, skip=("weights", "moe", "awq")), **field_types(QuantSpec, skip=FROM_GGUF_GRID)}


TOP_KEYS = ("model", "calibration", "quantize", "exports", "validation", "lock")
# recipe.lock.yaml's `lock:` section, what `run` checks before it computes (recipe_run.check_lock_inputs, check_lock_calibration)
LOCK_KEYS = {"device": str, "model_fingerprint": str, "calibration_data_sha256": str, "calibration_windows_sha256": str,
             "validation_sha256": dict, "recipe_file": dict, "versions": dict}


def parse_recipe(data: Any, base: Path = Path(".")) -> Recipe:
    """A validated Recipe from parsed YAML `data`; relative paths resolved against `base`."""
    if not isinstance(data, dict):
        raise InputError(f"recipe: expected a mapping of {', '.join(TOP_KEYS)}, got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise InputError(f"{key}: unknown key; expected one of {', '.join(TOP_KEYS)}")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InputError("model: expected a model directory (or builtin:smollm2-135m-instruct)")
    calibration = {} if data.get("calibration") is None else data["calibration"]
    if not isinstance(calibration, dict):
        raise InputError(f"calibration: expected a mapping, got {type(calibration).__name__}")
    calibration = dict(calibration)
    calibration_data = calibration.pop("data", None)
    if calibration_data is not None and (not isinstance(calibration_data, str) or not calibration_data.strip()):
        raise InputError(f"calibration.data={calibration_data!r}: expected a file path or 'self'")
    spec, grid, device = _quantize(data.get("quantize"))
    if data.get("lock") is None:  # a lock written before 0.3.0 lists every key: what it ran on is in its lock section
        _refuse_unread(spec.method, data.get("quantize") or {}, data.get("calibration") or {})
    exports = [] if data.get("exports") is None else data["exports"]
    if not isinstance(exports, list):
        raise InputError("exports: expected a list of {format: ...} mappings")
    steps = []
    for number, step in enumerate(exports):
        kwargs = section(f"exports[{number}]", step, ExportStep)
        if "format" not in kwargs:
            raise InputError(f"exports[{number}].format: missing; expected one of {', '.join(EXPORT_FORMATS)}")
        steps.append(ExportStep(**kwargs))
    validation = None
    if data.get("validation") is not None:
        kwargs = section("validation", data["validation"], ValidationStep)
        if "data" not in kwargs:
            raise InputError("validation.data: missing; expected an evaluation text file")
        for key in VALIDATION_FILES:
            if kwargs.get(key) is not None and not kwargs[key].strip():
                raise InputError(f"validation.{key}: empty; expected a file path")
            if kwargs.get(key) not in (None, "self"):
                kwargs[key] = str(_resolve(kwargs[key], base))
        validation = ValidationStep(**kwargs)
    model = model if model in BUILTIN_MODELS else str(_resolve(model, base))
    if calibration_data not in (None, "self"):
        calibration_data = str(_resolve(calibration_data, base))
    calibration_keys = section("calibration", calibration, CalibSpec)
    with prefixed("calibration."):
        calibration_spec = CalibSpec(**calibration_keys)
    return Recipe(model=model, calibration_data=calibration_data, calibration=calibration_spec, quantize=spec,
                  exports=tuple(steps), validation=validation, gguf_grid=grid, device=device, lock=_lock(data.get("lock")))


def _refuse_unread(method: Method, quantize: dict, calibration: dict) -> None:
    """InputError naming every key given under `quantize:` (and a `calibration:` section with
    any value set) that `method` never reads (`settings_unread_by`): the run would ignore them
    silently. Whole methods only: a key another key makes moot (moe.mix under policy routed
    with fallback rtn) is accepted."""
    given = [*(["calibration"] if any(value is not None for value in calibration.values()) else []),
             *(key for key in quantize if key not in ("moe", "awq")),
             *(f"{section}.{key}" for section in ("moe", "awq") for key in (quantize.get(section) or {}))]
    unread = [key for key in given if key in settings_unread_by(method)]
    if "calibration" in unread:
        raise InputError(f"calibration: method {method.value} rounds each weight to nearest without calibration data; "
                         "drop the section (or choose gptq, awq or awq+gptq)")
    if unread:
        keys, them = ", ".join(f"quantize.{key}" for key in unread), "it" if len(unread) == 1 else "them"
        raise InputError(f"{keys}: method {method.value} does not read {them}, so the run would ignore {them}; drop "
                         f"{them} (or choose a method that does)")


def _drop_unread(recipe: dict, method: Method) -> dict:
    """`recipe` (Recipe.to_dict's form) without the settings `method` never reads: a lock file
    lists what the run used, and reads back as a recipe `_refuse_unread` accepts."""
    for key in settings_unread_by(method):
        section, _, name = key.rpartition(".")
        if key == "calibration":
            recipe.pop(key, None)
        else:
            (recipe["quantize"][section] if section else recipe["quantize"]).pop(name, None)
    if not recipe["quantize"].get("awq", True):
        del recipe["quantize"]["awq"]
    return recipe


def _lock(data: Any) -> dict | None:
    """A lock file's `lock:` section, its keys and their types checked (the values are checked by `run`)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InputError(f"lock: expected a mapping of {', '.join(LOCK_KEYS)}, got {type(data).__name__}")
    for key, value in data.items():
        if key not in LOCK_KEYS:
            raise InputError(f"lock.{key}: unknown key; expected one of {', '.join(LOCK_KEYS)}")
        if value is not None and not isinstance(value, LOCK_KEYS[key]):
            raise InputError(f"lock.{key}={value!r}: expected {LOCK_KEYS[key].__name__}")
    return data


def _resolve(path: str, base: Path) -> Path:
    """`path` (~ expanded) made absolute against `base` and normalised (no `..` left in the lock)."""
    candidate = Path(path).expanduser()
    return Path(os.path.normpath(candidate if candidate.is_absolute() else base / candidate))


def load_recipe(path: Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=unique_keys_loader())
    except OSError as exc:
        raise InputError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except InputError as exc:  # a repeated key
        raise InputError(f"{path}: {exc}") from None
    try:
        return parse_recipe(data, path.absolute().parent)  # relative to the recipe as named (a link's folder)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
