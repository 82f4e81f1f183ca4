"""The GPTQ layout (AutoGPTQ/GPTQModel v1, vLLM, transformers).

For Llama 4 MoE exports the routed experts are written per expert (`experts.{e}.*`), the
names vLLM's loader maps; transformers does not unfuse quantized GPTQ/AWQ Llama 4 experts,
so it cannot load those (dense exports it can).

Per quantized linear `m` (N outputs, K inputs, G groups):
    m.qweight int32 [K*bits/32, N]   codes packed along the input dim, low bits first
    m.qzeros  int32 [G, N*bits/32]   (zero - 1) mod 2^bits packed along the output dim (v1)
    m.scales  fp16  [G, N]
    m.g_idx   int32 [K]              k // group_size (static groups keep it trivial)
`quantization_config`: quant_method gptq, bits, group_size, desc_act, sym, checkpoint_format.
"""

from __future__ import annotations

from pathlib import Path

import torch

from maverick_quant import __version__
from maverick_quant.bundle import Bundle
from maverick_quant.compress.pack import PACK_BITS, from_gptq_tensors, gptq_v1_zero_problem, to_gptq_tensors
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.exporters.packed import Layout, dynamic_grid, exclusion_fields, export_packed, vllm_moe_problem

PACKABLE_BITS = PACK_BITS  # whole int32 words of codes


def gptq_quantization_config(quant: dict, recipe: dict, unquantized: list[str] = (),
                             overrides: dict[str, dict] | None = None) -> dict:
    """The `quantization_config` block transformers/GPTQModel/vLLM read; bits overrides become
    positive `dynamic` rules (GPTQModel's and vLLM's per-module overrides)."""
    return {
        **exclusion_fields(list(unquantized), overrides),
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


def _from_gptq_checked(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedWeight:
    weight = from_gptq_tensors(tensors, bits, group_size)
    if not torch.equal(tensors["g_idx"], weight.group_index()):
        raise ValueError("g_idx is not k // group_size (desc_act exports are not read)")
    return weight


def _check(quant: dict, has_experts: bool = False) -> str | None:
    """What the GPTQ layout, and vLLM's GPTQ kernels that no CPU client can stand in for, accept:
    bits 2/4/8; for routed experts what vLLM's MoE kernels take (`vllm_moe_problem`) and a
    symmetric grid (Marlin's GPTQ types are symmetric: an asymmetric GPTQ checkpoint leaves
    vLLM's Marlin path for all its layers). desc_act is always written false (static groups)."""
    if quant["bits"] not in PACKABLE_BITS:
        return f"stores bits in {PACKABLE_BITS}; this bundle has bits={quant['bits']}"
    if has_experts and (problem := vllm_moe_problem(quant, symmetric_only=False)):
        return problem
    if has_experts and not quant["sym"]:
        return ("vLLM's Marlin GPTQ kernels take symmetric grids only; this MoE bundle is asymmetric. "
                "Quantize with --sym, or export --format awq (zero points included)")
    return None


GPTQ = Layout("gptq", ("qweight", "qzeros", "scales", "g_idx"), lambda weight, _quant, _dtype: to_gptq_tensors(weight),
              _from_gptq_checked, _check, gptq_quantization_config, dynamic_grid, zero_points=gptq_v1_zero_problem)


def export_gptq(bundle: Bundle, out_dir: Path, max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write the GPTQ checkpoint of `bundle` into the (empty) directory `out_dir`."""
    return export_packed(bundle, out_dir, GPTQ, max_shard_bytes)
