"""Export layouts by `--format` name, and reading an export back."""

from __future__ import annotations

from pathlib import Path

from maverick_quant.exporters.awq import AWQ
from maverick_quant.exporters.compressed_tensors import COMPRESSED_TENSORS
from maverick_quant.exporters.gptq import GPTQ
from maverick_quant.exporters.packed import ExportSource

LAYOUTS = {layout.name: layout for layout in (GPTQ, AWQ, COMPRESSED_TENSORS)}


def open_export(path: Path | str) -> ExportSource:
    """A packed export (any layout above) as a float `WeightSource`."""
    return ExportSource(path, LAYOUTS)
