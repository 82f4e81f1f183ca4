"""How big each output of a planned run is: the bundle and every export format, from the
quantized parameters on each grid (plan.py's `make_plan` asks; the formats' limits are
recipe_file's)."""

from __future__ import annotations

import functools

import torch

from maverick_quant.compress.gguf_blocks import BLOCK, BLOCK_TYPES, block_type_for_grid


@functools.lru_cache(maxsize=None)
def bundle_bytes_per_weight(grid) -> tuple[float, float]:
    """(code bytes per weight, bytes per group) of the bundle's own encoding of a weight on
    `grid` (a QuantSpec), measured on a probe weight [8, 1024] through `bundle.encode_quantized`:
    codes nibble-packed at 4 bits or fewer, else a byte each; per group an fp16 scale and a
    uint8 zero point (symmetric grids too), and an offset grid's super-block terms spread over
    its groups."""
    from maverick_quant.bundle import encode_quantized
    from maverick_quant.compress.grid import rtn_quantize

    rows, cols = 8, 1024
    weight = rtn_quantize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)), grid)
    stored = sum(t.numel() * t.element_size() for t in encode_quantized("probe", weight).values())
    code = 0.5 if grid.bits <= 4 else 1.0
    groups = rows * (cols // grid.group_size if grid.group_size > 0 else 1)
    return code, (stored - rows * cols * code) / groups


FORMAT_BYTES_PER_WEIGHT = {  # grid -> (code bytes per weight, bytes per group) beside the codes
    "bundle": bundle_bytes_per_weight,
    "gptq": lambda grid: (grid.bits / 8, 2 + grid.bits / 8),
    "awq": lambda grid: (grid.bits / 8, 2 + grid.bits / 8),
    "compressed-tensors": lambda grid: (grid.bits / 8, 2 + (0 if grid.sym else grid.bits / 8)),
}
GGUF_BYTES_PER_WEIGHT = {  # by the bundle's bits: the GGUF types it exports to (bytes per weight)
    bits: {f"gguf {t.name}": t.bytes_per_block / t.block for t in BLOCK_TYPES.values() if t.bits == bits} for bits in (4, 8)}


def output_bytes(params_by_grid: dict, base, passthrough: int, hidden: int,
                 packed_float: dict | None = None) -> dict[str, int]:
    """Size of every output format: {format: bytes} from the quantized parameters on each grid
    ({QuantSpec: params}; bits overrides add grids beside the run's `base`) and the bytes passed
    through (a per-channel grid has about params / hidden groups). `packed_float` ({grid:
    (params, bytes in the model's dtype)}): those of each grid's parameters that GPTQ / AWQ /
    compressed-tensors exports write as float (`LayerPlan.float_in_packed_exports`). In a GGUF a
    tensor on another grid than the run's gets its own width's type (`block_type_for_grid`: Q8_0
    for 8 bits, Q4_0 / Q4_1 for 4); a width no GGUF type stores leaves the GGUF formats out (the
    export refuses it)."""
    outputs = {}
    for fmt, per_weight in FORMAT_BYTES_PER_WEIGHT.items():
        if not format_stores(fmt, base, params_by_grid):
            continue
        total = passthrough
        for grid, params in params_by_grid.items():
            floated, float_bytes = (packed_float or {}).get(grid, (0, 0)) if fmt != "bundle" else (0, 0)
            code, per_group = per_weight(grid)
            packed = params - floated
            total += float_bytes + packed * code + packed / (grid.group_size if grid.group_size > 0 else hidden) * per_group
        outputs[fmt] = int(total)
    try:
        own = {grid: block_type_for_grid({"bits": grid.bits, "sym": grid.sym}) for grid in params_by_grid if grid != base}
    except ValueError:
        return outputs
    for fmt, per_weight in GGUF_BYTES_PER_WEIGHT.get(base.bits, {}).items():
        outputs[fmt] = int(passthrough + sum(params * (per_weight if grid == base else own[grid].bytes_per_block / BLOCK)
                                             for grid, params in params_by_grid.items()))
    return outputs


def format_stores(fmt: str, base, params_by_grid: dict) -> bool:
    """Whether export format `fmt` can store the run's grid `base` and every override width
    beside it (the limits `recipe_file` checks recipes against; the bundle stores anything)."""
    from maverick_quant.recipe_file import EXPORT_BITS, OVERRIDE_BITS

    if fmt not in EXPORT_BITS:
        return True
    others = {grid.bits for grid in params_by_grid if grid != base}
    return base.bits in EXPORT_BITS[fmt] and all(bits == base.bits or bits in OVERRIDE_BITS[fmt] for bits in others)
