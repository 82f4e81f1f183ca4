"""The compressed-tensors "pack-quantized" layout (transformers + compressed-tensors, vLLM).

Per quantized linear `m` (N outputs, K inputs, G groups), see compress/pack.py:
    m.weight_packed int32 [N, K*bits/32], m.weight_scale [N, G] (model dtype),
    m.weight_zero_point int32 [N*bits/32, G] (asymmetric only), m.weight_shape int64 [2].
`quantization_config` is built with compressed-tensors' own pydantic classes: one config
group targeting `Linear` (strategy "group", or "channel" for group_size -1), format
"pack-quantized", status "compressed", and an `ignore` list of regexes for every module
left in float (lm_head, routers, vision tower, projector). Routed experts are written per
expert (`experts.{e}.gate_proj.*`), the names transformers' sequential Llama 4 experts and
vLLM's expert mapping read.

The decompressed weight takes the scale's dtype, so scales are written in the model's
float dtype: exact for fp16/fp32 models; for bf16 models each fp16 scale is rounded to
bf16 (relative change at most 2^-9), as compressed-tensors' own bf16 checkpoints store them.
"""

from __future__ import annotations

import json
import re

from maverick_quant import __version__
from maverick_quant.compress.pack import PACK_BITS, from_compressed_tensors, to_compressed_tensors
from maverick_quant.exporters.packed import Layout, fused_names, vllm_moe_problem

FORMAT = "pack-quantized"


def ignore_patterns(unquantized: list[str]) -> list[str]:
    """compressed-tensors `ignore` entries ("re:" + regex, matched from the start of the full
    module name) for each unquantized name: the module itself or anything under it."""
    return [rf"re:(.*\.)?{re.escape(name)}($|\..*)" for name in unquantized]


def _weight_args(grid: dict):
    """compressed-tensors' QuantizationArgs of a grid {bits, group_size, sym}."""
    from compressed_tensors.quantization import QuantizationArgs

    grouped = grid["group_size"] != -1
    return QuantizationArgs(num_bits=grid["bits"], type="int", symmetric=grid["sym"], dynamic=False,
                            strategy="group" if grouped else "channel", group_size=grid["group_size"] if grouped else None)


def ct_quantization_config(quant: dict, recipe: dict, unquantized: list[str] = (),
                           overrides: dict[str, dict] | None = None) -> dict:
    """The `quantization_config` of a pack-quantized checkpoint, validated by compressed-tensors:
    group_0 targets every `Linear` on the bundle's grid; each other grid of bits overrides is a
    further group whose targets are its modules' exact names, and vLLM's fused names of the sets
    wholly in it (`...qkv_proj`, `...gate_up_proj`): vLLM matches its fused module's name before
    class names, compressed-tensors the unfused names (an exact name outranks a class name)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=_weight_args(quant), format=FORMAT)}
    by_grid: dict[str, list[str]] = {}
    for module, grid in (overrides or {}).items():
        by_grid.setdefault(json.dumps({k: grid[k] for k in ("bits", "group_size", "sym")}, sort_keys=True), []).append(module)
    for number, (grid, modules) in enumerate(by_grid.items(), start=1):
        groups[f"group_{number}"] = QuantizationScheme(targets=sorted(modules) + fused_names(modules),
                                                       weights=_weight_args(json.loads(grid)), format=FORMAT)
    config = QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status=QuantizationStatus.COMPRESSED,
                                ignore=ignore_patterns(list(unquantized)))
    import compressed_tensors

    return {**config.model_dump(mode="json"), "version": compressed_tensors.__version__,  # the format's version, as its own writer
            "quantizer": f"maverick-quant:{__version__}", "method": recipe.get("method")}


def ct_grid(quant: dict, module: str) -> tuple[int, int]:
    """(bits, group_size) of `module` in a pack-quantized `quantization_config`: the group
    that names it exactly, else the group that targets `Linear`."""
    groups = quant.get("config_groups") or {}
    if not groups or quant.get("format") != FORMAT:
        raise ValueError(f"expected config groups in format {FORMAT!r}; got {len(groups)} groups, "
                         f"format {quant.get('format')!r}")
    named = [group for group in groups.values() if module in group["targets"]]
    linear = [group for group in groups.values() if "Linear" in group["targets"]]
    if not named and not linear and len(groups) > 1:
        raise ValueError(f"no config group targets {module or 'Linear'}")
    weights = (named or linear or list(groups.values()))[0]["weights"]
    return int(weights["num_bits"]), int(weights.get("group_size") or -1)


def _check(quant: dict, has_experts: bool = False) -> str | None:
    """Bits 2/4/8 packed in int32 words; for routed experts what vLLM's compressed-tensors MoE
    kernel takes (`vllm_moe_problem`: 4/8 bits, grouped, symmetric)."""
    if quant["bits"] not in PACK_BITS:
        return f"packs bits in {PACK_BITS}; this bundle has bits={quant['bits']}"
    return vllm_moe_problem(quant, symmetric_only=True) if has_experts else None


COMPRESSED_TENSORS = Layout(
    "compressed-tensors", ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"),
    lambda weight, quant, dtype: to_compressed_tensors(weight, quant["sym"], dtype), from_compressed_tensors,
    _check, ct_quantization_config, ct_grid, groups_tile_k=True)
