"""The AWQ GEMM layout (AutoAWQ "gemm"; transformers, GPTQModel and vLLM read it).

Per quantized linear `m` (N outputs, K inputs, G = K / group_size groups), 4 bits:
    m.qweight int32 [K, N/8]   codes packed along the output dim, nibble order 0,2,4,6,1,3,5,7
    m.qzeros  int32 [G, N/8]   the real zero points, packed the same way
    m.scales  fp16  [G, N]
`quantization_config`: quant_method awq, version gemm, zero_point true, bits, group_size,
modules_to_not_convert (routers, vision tower, projector, lm_head).
"""

from __future__ import annotations

from maverick_quant import __version__
from maverick_quant.compress.pack import from_awq_tensors, to_awq_tensors
from maverick_quant.exporters.packed import Layout, exclusion_fields


def awq_quantization_config(quant: dict, recipe: dict, unquantized: list[str] = (), _overrides: dict | None = None) -> dict:
    """One grid for the whole checkpoint: bits overrides are refused before (per_module_grids)."""
    return {
        **exclusion_fields(list(unquantized)),
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
        "bits": quant["bits"],
        "group_size": quant["group_size"],
        "meta": {"quantizer": [f"maverick-quant:{__version__}"], "method": recipe.get("method")},
    }


def _check(quant: dict, _has_experts: bool = False) -> str | None:
    if quant["bits"] != 4 or quant["group_size"] == -1:
        return f"AWQ GEMM stores 4-bit weights in groups; this bundle has bits={quant['bits']}, group_size={quant['group_size']}"
    return None


AWQ = Layout("awq", ("qweight", "qzeros", "scales"), lambda weight, _quant, _dtype: to_awq_tensors(weight),
             from_awq_tensors, _check, awq_quantization_config, per_module_grids=False, groups_tile_k=True)
