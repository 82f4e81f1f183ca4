"""Bundle -> Hugging Face checkpoint with packed integer weights, for any `Layout` (GPTQ, AWQ).

Every quantized linear `m` becomes `m.<part>` tensors of the layout; routed experts are
unfused, one module per expert (`...experts.{e}.{gate_proj,up_proj,down_proj}`); everything
else passes through in its original dtype (norms, routers, a vision tower). Linears a layer plan
names in `float_in_packed_exports` (Llama 4's rope-layer q/k/v, a quantized router) are written
as float `.weight` holding the bundle's values: vLLM reads them right only so.
`config.json` gains the layout's `quantization_config`. Shards are safetensors with an
index, each module's tensors in one shard. `ExportSource` reads such a checkpoint back as
float tensors layer by layer, so `validate` can stream it like the original.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from maverick_quant.arch.base import FusedExpertsBuilder
from maverick_quant.bundle import Bundle, copy_model_files
from maverick_quant.checkpoint import Checkpoint
from maverick_quant.outputs import ShardedWriter, write_json_atomic
from maverick_quant.model_config import published_quirks_fixed
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.errors import InputError
from maverick_quant.recipe import offset_grid_name
from maverick_quant.streaming import CheckpointModelTensors


@dataclass(frozen=True)
class Layout:
    """A packed checkpoint format.

    name:        `--format` value and `quant_method`.
    parts:       tensor suffixes of one module ("qweight", ...); optional ones may be absent.
    to_tensors:  (QuantizedWeight [N, K], bundle quant dict, the model's float dtype) -> {part: tensor}.
    from_tensors: ({part: tensor}, bits, group_size) -> QuantizedWeight (raises ValueError if malformed).
    check:       (bundle quant dict, whether it has routed experts) -> None, or an error message if
                 the layout (or the engines that read it) cannot take it.
    config:      (bundle quant, recipe, unquantized module names, {module: grid} of bits
                 overrides) -> quantization_config.
    grid:        (quantization_config, full module name) -> (bits, group_size) of that module,
                 for reading an export back.
    per_module_grids: whether the layout's config can give modules their own grid (bits overrides).
    zero_points: (uint8 zero points of one module, bits) -> None, or why the layout cannot store
                 them; when given, every asymmetric module's zero points are checked before the
                 export writes anything (`refused_zero_points`).
    groups_tile_k: whether every module's K must be a multiple of its group size (no shorter
                 last group), which a recipe checks before any work.
    """

    name: str
    parts: tuple[str, ...]
    to_tensors: Callable[[QuantizedWeight, dict, torch.dtype], dict[str, torch.Tensor]]
    from_tensors: Callable[[dict[str, torch.Tensor], int, int], QuantizedWeight]
    check: Callable[[dict, bool], str | None]
    config: Callable[[dict, dict, list[str], dict[str, dict]], dict]
    grid: Callable[[dict, str], tuple[int, int]] = lambda quant, _module: (int(quant["bits"]), int(quant["group_size"]))
    per_module_grids: bool = True
    zero_points: Callable[[torch.Tensor, int], str | None] | None = None
    groups_tile_k: bool = False


VLLM_MOE_BITS = (4, 8)


def vllm_moe_problem(quant: dict, symmetric_only: bool) -> str | None:
    """What vLLM's kernels for Llama 4's routed experts refuse in the bundle's grid, or None.

    Llama 4 multiplies the router score into the expert input (`apply_router_weight_on_input`),
    which vLLM's fused Marlin MoE does not take (`check_moe_marlin_supports_layer`), so its
    experts run on the kernels left: MoeWNA16 (GPTQ, AWQ) and compressed-tensors' WNA16 MoE
    method. Both take 4 or 8 bits only, in groups (their scale tensors are sized by
    hidden // group_size, negative for per-channel -1), and the compressed-tensors one asserts
    a symmetric grid (`symmetric_only`)."""
    if quant["bits"] not in VLLM_MOE_BITS:
        return (f"vLLM's kernels for Llama 4's routed experts take bits in {VLLM_MOE_BITS}; this MoE bundle has "
                f"bits={quant['bits']}")
    if int(quant["group_size"]) == -1:
        return ("vLLM's kernels for Llama 4's routed experts take grouped scales, not per channel; this MoE bundle "
                "has group_size -1 (quantize with --group-size 128)")
    if symmetric_only and not quant["sym"]:
        return ("vLLM's compressed-tensors kernel for Llama 4's routed experts takes symmetric grids only "
                "(`Only symmetric quantization is supported for MoE`); this MoE bundle is asymmetric. "
                "Quantize with --sym, or export --format awq (zero points included)")
    return None


def unquantized_modules(bundle: Bundle) -> list[str]:
    """Module name patterns left in float: pass-through towers (vision, projector), lm_head,
    routers, the linears a keep_float override kept and those written float for the engines
    (`float_for_engines`). Used for `modules_to_not_convert` and, as negative `dynamic` rules
    ("-:" + regex), by vLLM's loaders."""
    names = ["lm_head", *(prefix.rstrip(".") for prefix in bundle.table.passthrough_prefixes)]
    plans = [bundle.table.plan(bundle.text_config, i) for i in range(bundle.num_layers)]
    routers = sorted({plan.moe.router for plan in plans if plan.moe is not None})
    written_float = [bundle.table.prefix(index) + name for index, linears in float_for_engines(bundle).items()
                     for name in linears]
    return list(dict.fromkeys(names + routers + kept_float_modules(bundle) + written_float))


def float_for_engines(bundle: Bundle) -> dict[int, list[str]]:
    """{layer: its quantized linears (relative names) that packed exports write as float
    `.weight`, dequantized to the model's dtype}: those the layer plan's
    `float_in_packed_exports` names (Llama 4's rope-layer q/k/v and a quantized router, which
    vLLM reads right only as float). The values are the bundle's, so the exported function is
    unchanged; only their storage is wider."""
    out = {}
    for index, layer in enumerate(bundle.manifest["layers"]):
        plan = bundle.table.plan(bundle.text_config, index)
        linears = [name for name in plan.float_in_packed_exports if name in layer["quantized"]]
        if linears:
            out[index] = linears
    return out


# vLLM loads these sibling linears as one fused module (packed_modules_mapping), on one quantization
VLLM_FUSED = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def _fused_siblings(leaf: str) -> tuple[str, ...]:
    return next((fused for fused in VLLM_FUSED if leaf in fused), ())


def _treatment(bundle: Bundle, index: int, name: str) -> str | dict | None:
    """How layer `index`'s linear `name` is stored: "float" (kept), its grid, or None (absent)."""
    if name in bundle.kept_float(index):
        return "float"
    return bundle.tensor_quant(index, name) if name in bundle.manifest["layers"][index]["quantized"] else None


def _describe(treatment: str | dict) -> str:
    return treatment if isinstance(treatment, str) else f"{treatment['bits']}-bit"


def check_fused_sets(bundle: Bundle) -> None:
    """InputError when siblings that vLLM fuses into one module (q/k/v, gate/up) are stored
    differently: one kept in float and another quantized, or quantized on different grids (bits
    overrides). vLLM cannot load either."""
    for index in range(bundle.num_layers):
        names = [*bundle.manifest["layers"][index]["quantized"], *bundle.kept_float(index)]
        refuse_split_fused_sets(bundle.table.prefix(index), {name: _treatment(bundle, index, name) for name in names})


def refuse_split_fused_sets(prefix: str, treatments: dict[str, str | dict]) -> None:
    """InputError when two linears of one layer (`prefix`) that vLLM fuses into one module are
    given different treatments ({relative linear name: "float" or its grid}): `check_fused_sets`
    for a bundle, `run` for a recipe's overrides before any work."""
    for name in treatments:
        parent, _, leaf = name.rpartition(".")
        siblings = {f"{parent}.{s}": treatments[f"{parent}.{s}"] for s in _fused_siblings(leaf)
                    if f"{parent}.{s}" in treatments}
        if len({json.dumps(t, sort_keys=True) for t in siblings.values()}) > 1:
            stored = "; ".join(f"{prefix}{s}: {_describe(t)}" for s, t in siblings.items())
            raise InputError(f"vLLM fuses {'/'.join(_fused_siblings(leaf))} into one module of one quantization, but "
                             f"they are stored differently ({stored}); give them the same --keep-float or "
                             f"--bits-override (e.g. '{re.escape(parent)}\\.({'|'.join(_fused_siblings(leaf))})')")


def kept_float_modules(bundle: Bundle) -> list[str]:
    """Full names of the linears a keep_float override left in float (fused sets checked)."""
    check_fused_sets(bundle)
    return [bundle.table.prefix(index) + name for index in range(bundle.num_layers) for name in bundle.kept_float(index)]


def override_rules(overrides: dict[str, dict]) -> list[tuple[str, dict]]:
    """(regex, grid) rules that match the modules of `overrides` ({full name: grid}, from
    `Bundle.overridden_grids`): one per (parent module, grid), matched with re.match from the
    start of a name, with the fused module names vLLM gives a whole set (qkv_proj, gate_up_proj)."""
    by_parent: dict[tuple[str, str], list[str]] = {}
    for module, grid in overrides.items():
        parent, _, leaf = module.rpartition(".")
        by_parent.setdefault((parent, json.dumps(grid, sort_keys=True)), []).append(leaf)
    rules = []
    for (parent, grid), leaves in by_parent.items():
        fused = [name for members, name in VLLM_FUSED.items() if set(members) <= set(leaves)]
        alternatives = "|".join(re.escape(name) for name in sorted(leaves) + fused)
        rules.append((rf"^(.*\.)?{re.escape(parent)}\.({alternatives})$", json.loads(grid)))
    return rules


def fused_names(modules: list[str]) -> list[str]:
    """vLLM's names (`...self_attn.qkv_proj`, `...mlp.gate_up_proj`) of the fused sets wholly in `modules`."""
    present, names = set(modules), []
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        names += [f"{parent}.{fused}" for members, fused in VLLM_FUSED.items()
                  if leaf == members[0] and all(f"{parent}.{member}" in present for member in members)]
    return names


def exclusion_fields(unquantized: list[str], overrides: dict[str, dict] | None = None) -> dict:
    """`modules_to_not_convert` and the `dynamic` rules of GPTQModel and vLLM: "-:" + regex for
    each unquantized module (and for vLLM's fused name of a set kept whole: vLLM matches the rules
    on `qkv_proj`, not q_proj), then "+:" + regex with the grid of each bits override (the first
    matching rule wins in both)."""
    dynamic = {f"-:.*{re.escape(name)}.*": {} for name in [*unquantized, *fused_names(unquantized)]}
    for regex, grid in override_rules(overrides or {}):
        dynamic[f"+:{regex}"] = {"bits": grid["bits"], "group_size": grid["group_size"], "sym": grid["sym"],
                                 "desc_act": False}
    return {"modules_to_not_convert": list(unquantized), "dynamic": dynamic}


def dynamic_grid(quant: dict, module: str) -> tuple[int, int]:
    """(bits, group_size) of `module` under a GPTQ `quantization_config` with `dynamic` rules."""
    for pattern, override in (quant.get("dynamic") or {}).items():
        if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), module):
            return int(override.get("bits", quant["bits"])), int(override.get("group_size", quant["group_size"]))
    return int(quant["bits"]), int(quant["group_size"])


def refused_zero_points(bundle: Bundle, layout: Layout, written_float: dict[int, list[str]]) -> str | None:
    """Why `layout` cannot store some asymmetric module's zero points, naming the first such
    modules, or None. Reads only the bundle's `.zeros` tensors (`Bundle.stored_zero_points`), so
    a bundle the export would refuse halfway (hours into a large model) is refused first."""
    grids = [bundle.quant, *bundle.overridden_grids().values()]
    if layout.zero_points is None or all(grid["sym"] for grid in grids):
        return None
    refused = []
    for index in range(bundle.num_layers):
        quantized = bundle.manifest["layers"][index]["quantized"]
        for module, zeros in bundle.stored_zero_points(index):
            grid = bundle.tensor_quant(index, module) if module in quantized else bundle.quant
            if grid["sym"] or module in written_float.get(index, ()):
                continue
            if why := layout.zero_points(zeros, int(grid["bits"])):
                refused.append(f"{bundle.table.prefix(index)}{module}: {why}")
    if not refused:
        return None
    return f"{len(refused)} modules' zero points cannot be stored, e.g. " + "; ".join(refused[:3])


def export_packed(bundle: Bundle, out_dir: Path, layout: Layout, max_shard_bytes: int = 5 * 10**9,
                  show_progress: bool = True) -> list[str]:
    """Write `bundle` in `layout` into the (empty) directory `out_dir`; returns the files written."""
    has_experts = any(layer.get("experts") for layer in bundle.manifest["layers"])
    written_float = float_for_engines(bundle)
    unquantized = unquantized_modules(bundle)  # fused sets checked first
    overrides = {module: grid for module, grid in bundle.overridden_grids().items() if module not in unquantized}
    problem = layout.check(bundle.quant, has_experts) or next(
        (f"{module} (a bits override): {why}" for module, grid in overrides.items() if (why := layout.check(grid, False))), None)
    if overrides and not layout.per_module_grids:
        problem = (f"the layout has one grid per checkpoint, and bits overrides put {len(overrides)} linears on others "
                   f"(e.g. {next(iter(overrides))}): export --format gptq, compressed-tensors or gguf")
    grid = offset_grid_name(bundle.quant)
    if grid:
        problem = (f"the bundle is on llama.cpp's own {grid} grid (quantize --gguf-grid {grid}: fp16 offsets that "
                   f"no (code - zero) x scale layout holds), which only --format gguf --gguf-type {grid} stores")
    problem = problem or refused_zero_points(bundle, layout, written_float)
    if problem:
        raise InputError(f"--format {layout.name}: {problem}")
    dtype = bundle.float_dtype()

    def convert(module: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        try:
            grid = overrides.get(module, bundle.quant)
            return {f"{module}.{part}": t for part, t in layout.to_tensors(weight, grid, dtype).items()}
        except ValueError as exc:
            raise InputError(f"--format {layout.name}: {module} (shape {list(weight.shape)}): {exc}") from None

    writer = ShardedWriter(out_dir, max_shard_bytes)
    for index in tqdm(range(bundle.num_layers), desc=f"export {layout.name}", unit="layer", disable=not show_progress):
        prefix = bundle.table.prefix(index)
        quantized, passthrough = bundle.quantized_layer(index)
        for name, weight in quantized.items():
            writer.add_group({f"{prefix}{name}.weight": weight.dequantize(dtype)}
                             if name in written_float.get(index, ()) else convert(prefix + name, weight))
        writer.add_group({prefix + name: t for name, t in passthrough.items()})
        for first, chunk in bundle.expert_chunks(index):
            experts = bundle.table.plan(bundle.text_config, index).moe.experts
            for offset in range(next(iter(chunk.values())).shape[0]):
                module = f"{prefix}{experts}.{first + offset}"
                writer.add_group({key: t for name, weight in chunk.items()
                                  for key, t in convert(f"{module}.{name}", weight[offset]).items()})
    for name in bundle.model_tensor_names():  # one group each: embeddings, lm_head and a vision tower split over shards
        writer.add_group({name: bundle.model_tensor(name)})
    shards = writer.close()
    copied = copy_model_files(bundle.root, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    published_quirks_fixed(config)  # what transformers 5 refuses, written as the value it means
    # matched anywhere in a name, so text-only loading (AutoModelForCausalLM on Llama 4) matches them too
    unquantized_anywhere = list(dict.fromkeys(bundle.table.loader_name(name) for name in unquantized))
    config["quantization_config"] = layout.config(bundle.quant, bundle.manifest["recipe"], unquantized_anywhere, overrides)
    write_json_atomic(out_dir / "config.json", config)
    return shards + copied


class ExportSource(CheckpointModelTensors):
    """A packed export read back lazily as float tensors (a `WeightSource`), dequantized on the
    `device` its readers ask for (`dequantizes`)."""

    dequantizes = True

    def __init__(self, export_dir: Path | str, layouts: dict[str, Layout]):
        from maverick_quant.arch.registry import table_for

        self.checkpoint = Checkpoint(export_dir)
        self.config = self.checkpoint.load_config()
        self.table = table_for(self.config, str(self.checkpoint.model_dir / "config.json"))
        self.text_config = self.table.text_config(self.config)
        quant = getattr(self.config, "quantization_config", None) or {}
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        if quant.get("quant_method") not in layouts:
            raise InputError(f"{export_dir}/config.json: quantization_config.quant_method {quant.get('quant_method')!r} "
                             f"is not one of {sorted(layouts)}")
        self.layout = layouts[quant["quant_method"]]
        self.quant = quant
        try:
            self.layout.grid(quant, "")
        except (KeyError, TypeError, ValueError, re.error) as exc:
            raise InputError(f"{export_dir}/config.json: quantization_config is not a readable "
                             f"{quant['quant_method']} config: {exc!r}") from None

    def _linear(self, module: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Weight of the linear `module` (full name) dequantized on `device`, or its float weight
        when it was left unquantized (a keep_float override). The layout's tensors are decoded
        (and checked) on the host, where their shape tensors and g_idx are read; the unpacked
        codes, one byte a weight, with the scales and zeros, then move to `device`."""
        if f"{module}.weight" in self.checkpoint.tensors:
            return self.checkpoint.get(f"{module}.weight")
        tensors = {part: self.checkpoint.get(f"{module}.{part}") for part in self.layout.parts
                   if f"{module}.{part}" in self.checkpoint.tensors}
        grid = self.layout.grid(self.quant, module)  # the config was checked when the export was opened
        try:
            return self.layout.from_tensors(tensors, *grid).map_tensors(lambda t: t.to(device)).dequantize()
        except KeyError as exc:
            raise InputError(f"{self.checkpoint.model_dir}: module {module}: tensor {module}.{exc.args[0]} is missing") from None
        except ValueError as exc:
            raise InputError(f"{self.checkpoint.model_dir}: module {module}: {exc}") from None

    def layer_tensors(self, index: int, experts: bool = True, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Float tensors of layer `index` (the quantized ones dequantized on `device`); per-expert
        modules are dequantized and fused back into the model's [E, K, parts*N] expert tensors."""
        prefix, plan = self.table.prefix(index), self.table.plan(self.text_config, index)
        out = {}
        for name in plan.passthrough:  # a quantized router has packed parts instead of weight
            stored = self.checkpoint.tensors.get(prefix + name)
            out[name] = self.checkpoint.get(prefix + name) if stored else self._linear(prefix + name.removesuffix(".weight"), device)
        out.update({f"{name}.weight": self._linear(prefix + name, device) for name in plan.linears})
        if experts and plan.moe is not None:
            out.update(self.expert_tensors(index, 0, plan.moe.num_experts, device))
        return out

    def expert_tensors(self, index: int, first: int, count: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Experts [first, first+count) of layer `index`, dequantized on `device` one expert at a time
        into the fused tensors the model stores (`FusedExpertsBuilder`)."""
        prefix, moe = self.table.prefix(index), self.table.plan(self.text_config, index).moe
        fused = FusedExpertsBuilder(moe, count)
        for linear in moe.expert_linears:
            for expert in range(first, first + count):
                fused.add(linear.name, expert - first, self._linear(f"{prefix}{moe.experts}.{expert}.{linear.name}", device)[None])
        return fused.fused
