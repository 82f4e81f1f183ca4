"""Look up the architecture table for a model config."""

from __future__ import annotations

from typing import Any

from maverick_quant.arch.base import ArchTable
from maverick_quant.arch.llama import LLAMA
from maverick_quant.arch.llama4 import LLAMA4, LLAMA4_CAUSAL
from maverick_quant.errors import InputError

TABLES: tuple[ArchTable, ...] = (LLAMA, LLAMA4, LLAMA4_CAUSAL)


def table_for(config: Any, source: str = "config.json") -> ArchTable:
    """The table serving `config.architectures`; InputError naming the file if none does."""
    names = tuple(getattr(config, "architectures", None) or ())
    for table in TABLES:
        if any(name in table.architectures for name in names):
            _refuse_biases(table.text_config(config), source)
            return table
    supported = sorted(a for t in TABLES for a in t.architectures)
    raise InputError(f"{source}: architectures {list(names)} are not supported; expected one of {supported}")


def _refuse_biases(text_config: Any, source: str) -> None:
    """InputError for a config whose linears carry biases: the tables list weights only (Llama
    and Llama 4 checkpoints have none), so such a model would fail layer by layer mid-run."""
    given = [key for key in ("attention_bias", "mlp_bias") if getattr(text_config, key, False)]
    if given:
        raise InputError(f"{source}: {' and '.join(f'{key}: true' for key in given)} is not supported "
                         "(the Llama and Llama 4 tables quantize bias-free linears)")
