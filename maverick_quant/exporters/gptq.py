"""Bundle -> Hugging Face checkpoint in the GPTQ layout (AutoGPTQ/GPTQModel v1, vLLM, transformers).

Per quantized linear `m` (N outputs, K inputs, G groups):
    m.qweight int32 [K*bits/32, N]   codes packed along the input dim, low bits first
    m.qzeros  int32 [G, N*bits/32]   (zero - 1) mod 2^bits packed along the output dim (v1)
    m.scales  fp16  [G, N]
    m.g_idx   int32 [K]              k // group_size (static groups keep it trivial)
Everything else passes through in its original dtype. `config.json` gains a
`quantization_config` with quant_method gptq. Shards are safetensors with an index; each
module's tensors stay in one shard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from maverick_quant import __version__
from maverick_quant.arch.base import fuse_experts
from maverick_quant.bundle import Bundle, copy_model_files
from maverick_quant.checkpoint import Checkpoint, ShardedWriter, write_json_atomic
from maverick_quant.compress.pack import from_gptq_tensors, to_gptq_tensors
from maverick_quant.errors import InputError

PACKABLE_BITS = (2, 4, 8)
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def unquantized_modules(bundle: Bundle) -> list[str]:
    """Module name patterns left in float: routers (unless quantized), pass-through towers
    (vision, projector) and lm_head. Used for `modules_to_not_convert` and, as negative
    `dynamic` rules ("-:" + regex), by vLLM's GPTQ loader."""
    names = ["lm_head", *(prefix.rstrip(".") for prefix in bundle.table.passthrough_prefixes)]
    quantized_router = bundle.manifest["recipe"].get("moe", {}).get("quantize_router", False)
    routers = {bundle.table.plan(bundle.text_config, i).moe.router for i in range(bundle.num_layers)
               if bundle.table.plan(bundle.text_config, i).moe is not None}
    return names + ([] if quantized_router else sorted(routers))


def gptq_quantization_config(quant: dict, recipe: dict, unquantized: list[str] = ()) -> dict:
    """The `quantization_config` block transformers/GPTQModel/vLLM read."""
    return {
        "modules_to_not_convert": list(unquantized),
        "dynamic": {f"-:.*{re.escape(name)}.*": {} for name in unquantized},
        "quant_method": "gptq",
        "bits": quant["bits"],
        "group_size": quant["group_size"],
        "desc_act": False,
        "sym": quant["sym"],
        "static_groups": quant["act_order"],
        "true_sequential": recipe.get("true_sequential", True),
        "damp_percent": quant["damp"],
        "checkpoint_format": "gptq",
        "lm_head": False,
        "meta": {"quantizer": [f"maverick-quant:{__version__}"]},
    }


def export_gptq(bundle: Bundle, out_dir: Path, max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write the GPTQ checkpoint of `bundle` into the (empty) directory `out_dir`."""
    bits = bundle.quant["bits"]
    if bits not in PACKABLE_BITS:
        raise InputError(f"--format gptq stores bits in {PACKABLE_BITS}; this bundle has bits={bits}")
    writer = ShardedWriter(out_dir, max_shard_bytes)
    for index in range(bundle.num_layers):
        prefix = bundle.table.prefix(index)
        quantized, passthrough = bundle.quantized_layer(index)
        for name, weight in quantized.items():
            writer.add_group({f"{prefix}{name}.{part}": t for part, t in to_gptq_tensors(weight).items()})
        writer.add_group({prefix + name: t for name, t in passthrough.items()})
        for first, chunk in bundle.expert_chunks(index):
            experts = bundle.table.plan(bundle.text_config, index).moe.experts
            for offset in range(next(iter(chunk.values())).shape[0]):
                module = f"{prefix}{experts}.{first + offset}"
                writer.add_group({f"{module}.{name}.{part}": t for name, weight in chunk.items()
                                  for part, t in to_gptq_tensors(weight[offset]).items()})
    writer.add_group({name: bundle.model_tensor(name) for name in bundle.model_tensor_names()})
    shards = writer.close()
    copied = copy_model_files(bundle.root, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = gptq_quantization_config(bundle.quant, bundle.manifest["recipe"],
                                                             unquantized_modules(bundle))
    write_json_atomic(out_dir / "config.json", config)
    return shards + copied


class GPTQExportSource:
    """A GPTQ-layout checkpoint read back lazily as float tensors (a `WeightSource`)."""

    def __init__(self, export_dir: Path | str):
        from maverick_quant.arch.registry import table_for

        self.checkpoint = Checkpoint(export_dir)
        self.config = self.checkpoint.load_config()
        self.table = table_for(self.config, str(self.checkpoint.model_dir / "config.json"))
        self.text_config = self.table.text_config(self.config)
        quant = getattr(self.config, "quantization_config", None) or {}
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        if quant.get("quant_method") != "gptq":
            raise InputError(f"{export_dir}/config.json: quantization_config.quant_method is not 'gptq'")
        self.bits, self.group_size = int(quant["bits"]), int(quant["group_size"])

    def _linear(self, module: str) -> torch.Tensor:
        tensors = {part: self.checkpoint.get(f"{module}.{part}") for part in GPTQ_PARTS}
        weight = from_gptq_tensors(tensors, self.bits, self.group_size)
        if not torch.equal(tensors["g_idx"], weight.group_index()):
            raise InputError(f"{self.checkpoint.model_dir}: {module}.g_idx is not k // group_size (desc_act exports are not read)")
        return weight.dequantize()

    def layer_tensors(self, index: int, experts: bool = True) -> dict[str, torch.Tensor]:
        """Float tensors of layer `index`; per-expert GPTQ modules are dequantized and fused
        back into the model's [E, K, parts*N] expert tensors."""
        prefix, plan = self.table.prefix(index), self.table.plan(self.text_config, index)
        out = {}
        for name in plan.passthrough:  # a quantized router has qweight instead of weight
            stored = self.checkpoint.tensors.get(prefix + name)
            out[name] = self.checkpoint.get(prefix + name) if stored else self._linear(prefix + name.removesuffix(".weight"))
        out.update({f"{name}.weight": self._linear(prefix + name) for name in plan.linears})
        if experts and plan.moe is not None:
            moe = plan.moe
            unfused = {l.name: torch.stack([self._linear(f"{prefix}{moe.experts}.{e}.{l.name}") for e in range(moe.num_experts)])
                       for l in moe.expert_linears}
            out.update(fuse_experts(moe, unfused))
        return out

    def model_tensor(self, name: str) -> torch.Tensor:
        if name == self.table.lm_head and name not in self.checkpoint.tensors:
            name = self.table.embed
        return self.checkpoint.get(name)

    def embedding_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.get_rows(self.table.embed, rows)
