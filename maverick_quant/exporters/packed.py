"""Bundle -> Hugging Face checkpoint with packed integer weights, for any `Layout` (GPTQ, AWQ).

Every quantized linear `m` becomes `m.<part>` tensors of the layout; routed experts are
unfused, one module per expert (`...experts.{e}.{gate_proj,up_proj,down_proj}`); everything
else passes through in its original dtype (norms, routers unless quantized, a vision tower).
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

from maverick_quant.arch.base import fuse_experts
from maverick_quant.bundle import Bundle, copy_model_files
from maverick_quant.checkpoint import Checkpoint, ShardedWriter, write_json_atomic
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
    config:      (bundle quant, recipe, unquantized module names) -> quantization_config.
    grid:        quantization_config -> (bits, group_size), for reading an export back.
    """

    name: str
    parts: tuple[str, ...]
    to_tensors: Callable[[QuantizedWeight, dict, torch.dtype], dict[str, torch.Tensor]]
    from_tensors: Callable[[dict[str, torch.Tensor], int, int], QuantizedWeight]
    check: Callable[[dict, bool], str | None]
    config: Callable[[dict, dict, list[str]], dict]
    grid: Callable[[dict], tuple[int, int]] = lambda quant: (int(quant["bits"]), int(quant["group_size"]))


def unquantized_modules(bundle: Bundle) -> list[str]:
    """Module name patterns left in float: routers (unless quantized), pass-through towers
    (vision, projector) and lm_head. Used for `modules_to_not_convert` and, as negative
    `dynamic` rules ("-:" + regex), by vLLM's loaders."""
    names = ["lm_head", *(prefix.rstrip(".") for prefix in bundle.table.passthrough_prefixes)]
    quantized_router = bundle.manifest["recipe"].get("moe", {}).get("quantize_router", False)
    plans = [bundle.table.plan(bundle.text_config, i) for i in range(bundle.num_layers)]
    routers = {plan.moe.router for plan in plans if plan.moe is not None}
    return names + ([] if quantized_router else sorted(routers)) + kept_float_modules(bundle)


# vLLM loads these sibling linears as one fused module (packed_modules_mapping), on one quantization
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def kept_float_modules(bundle: Bundle) -> list[str]:
    """Full names of the linears a keep_float override left in float. InputError when one of a
    set vLLM fuses (q/k/v, gate/up) is kept and a sibling is quantized: vLLM cannot load that."""
    kept = []
    for index in range(bundle.num_layers):
        prefix, names = bundle.table.prefix(index), bundle.kept_float(index)
        quantized = bundle.manifest["layers"][index]["quantized"]
        for name in names:
            parent, _, leaf = name.rpartition(".")
            siblings = next((fused for fused in VLLM_FUSED if leaf in fused), ())
            mixed = [f"{parent}.{s}" for s in siblings if f"{parent}.{s}" in quantized]
            if mixed:
                raise InputError(f"{prefix}{name} is kept in float but {', '.join(mixed)} is quantized: vLLM fuses "
                                 f"{'/'.join(siblings)} into one module of one quantization; keep all of them "
                                 f"(e.g. --keep-float '{re.escape(parent)}\\.({'|'.join(siblings)})') or none")
            kept.append(prefix + name)
    return kept


def exclusion_fields(unquantized: list[str]) -> dict:
    return {"modules_to_not_convert": list(unquantized),
            "dynamic": {f"-:.*{re.escape(name)}.*": {} for name in unquantized}}


def export_packed(bundle: Bundle, out_dir: Path, layout: Layout, max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write `bundle` in `layout` into the (empty) directory `out_dir`; returns the files written."""
    has_experts = any(layer.get("experts") for layer in bundle.manifest["layers"])
    problem = layout.check(bundle.quant, has_experts)
    grid = offset_grid_name(bundle.quant)
    if grid:
        problem = (f"the bundle is on llama.cpp's own {grid} grid (quantize --gguf-grid {grid}: fp16 offsets that "
                   f"no (code - zero) x scale layout holds), which only --format gguf --gguf-type {grid} stores")
    if problem:
        raise InputError(f"--format {layout.name}: {problem}")
    dtype = bundle.float_dtype()

    def convert(module: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        try:
            return {f"{module}.{part}": t for part, t in layout.to_tensors(weight, bundle.quant, dtype).items()}
        except ValueError as exc:
            raise InputError(f"--format {layout.name}: {module} (shape {list(weight.shape)}): {exc}") from None

    writer = ShardedWriter(out_dir, max_shard_bytes)
    for index in range(bundle.num_layers):
        prefix = bundle.table.prefix(index)
        quantized, passthrough = bundle.quantized_layer(index)
        for name, weight in quantized.items():
            writer.add_group(convert(prefix + name, weight))
        writer.add_group({prefix + name: t for name, t in passthrough.items()})
        for first, chunk in bundle.expert_chunks(index):
            experts = bundle.table.plan(bundle.text_config, index).moe.experts
            for offset in range(next(iter(chunk.values())).shape[0]):
                module = f"{prefix}{experts}.{first + offset}"
                writer.add_group({key: t for name, weight in chunk.items()
                                  for key, t in convert(f"{module}.{name}", weight[offset]).items()})
    writer.add_group({name: bundle.model_tensor(name) for name in bundle.model_tensor_names()})
    shards = writer.close()
    copied = copy_model_files(bundle.root, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = layout.config(bundle.quant, bundle.manifest["recipe"], unquantized_modules(bundle))
    write_json_atomic(out_dir / "config.json", config)
    return shards + copied


class ExportSource(CheckpointModelTensors):
    """A packed export read back lazily as float tensors (a `WeightSource`)."""

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
        try:
            self.bits, self.group_size = self.layout.grid(quant)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{export_dir}/config.json: quantization_config is not a readable "
                             f"{quant['quant_method']} config: {exc!r}") from None

    def _linear(self, module: str) -> torch.Tensor:
        """Dequantized weight of the linear `module` (full name), or its float weight when it was
        left unquantized (a keep_float override)."""
        if f"{module}.weight" in self.checkpoint.tensors:
            return self.checkpoint.get(f"{module}.weight")
        tensors = {part: self.checkpoint.get(f"{module}.{part}") for part in self.layout.parts
                   if f"{module}.{part}" in self.checkpoint.tensors}
        try:
            return self.layout.from_tensors(tensors, self.bits, self.group_size).dequantize()
        except KeyError as exc:
            raise InputError(f"{self.checkpoint.model_dir}: module {module}: tensor {module}.{exc.args[0]} is missing") from None
        except ValueError as exc:
            raise InputError(f"{self.checkpoint.model_dir}: module {module}: {exc}") from None

    def layer_tensors(self, index: int, experts: bool = True) -> dict[str, torch.Tensor]:
        """Float tensors of layer `index`; per-expert modules are dequantized and fused back
        into the model's [E, K, parts*N] expert tensors."""
        prefix, plan = self.table.prefix(index), self.table.plan(self.text_config, index)
        out = {}
        for name in plan.passthrough:  # a quantized router has packed parts instead of weight
            stored = self.checkpoint.tensors.get(prefix + name)
            out[name] = self.checkpoint.get(prefix + name) if stored else self._linear(prefix + name.removesuffix(".weight"))
        out.update({f"{name}.weight": self._linear(prefix + name) for name in plan.linears})
        if experts and plan.moe is not None:
            out.update(self.expert_tensors(index, 0, plan.moe.num_experts))
        return out

    def expert_tensors(self, index: int, first: int, count: int) -> dict[str, torch.Tensor]:
        """Experts [first, first+count) of layer `index`, dequantized and fused as the model stores them."""
        prefix, moe = self.table.prefix(index), self.table.plan(self.text_config, index).moe
        unfused = {l.name: torch.stack([self._linear(f"{prefix}{moe.experts}.{e}.{l.name}") for e in range(first, first + count)])
                   for l in moe.expert_linears}
        return fuse_experts(moe, unfused)
