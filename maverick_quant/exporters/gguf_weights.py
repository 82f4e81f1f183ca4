"""What the GGUF writers read: a bundle (`BundleWeights`, linears as QuantizedWeight) or an
original float model (`FloatWeights`, every linear re-quantized to the export's type), both
behind one interface: model-level tensors by name, and per layer its float tensors, linears
with their grids and shapes, and routed experts chunk by chunk (one layer held at a time)."""

from __future__ import annotations

from pathlib import Path

import torch

from maverick_quant.arch.base import unfuse_experts
from maverick_quant.bundle import Bundle
from maverick_quant.checkpoint import TORCH_DTYPES
from maverick_quant.compress.types import QuantizedWeight


class BundleWeights:
    """The GGUF writer's view of a bundle: linears as QuantizedWeight, read lazily."""

    def __init__(self, bundle: Bundle):
        self.bundle, self.root, self.table = bundle, bundle.root, bundle.table
        self.config, self.quant, self.num_layers = bundle.text_config, bundle.quant, bundle.num_layers
        self.model_config = bundle.config  # the whole model's (a vision tower's too)
        self.name = Path(bundle.manifest["source"]["model_dir"]).name
        self._cached: tuple[int, tuple] | None = None  # (layer index, its decoded tensors)

    def model_tensor_info(self, name: str) -> tuple[tuple[int, ...], torch.dtype] | None:
        if name not in self.bundle.model_tensor_names() and name != self.table.embed:
            return None
        info = self.bundle.model_tensor_info(name)
        return tuple(info.shape), TORCH_DTYPES[info.dtype]

    def model_tensor(self, name: str) -> torch.Tensor:
        return self.bundle.model_tensor(name)

    def model_tensor_names(self) -> list[str]:
        """Names of the model-level tensors kept in float (embeddings, norms, a vision tower)."""
        return self.bundle.model_tensor_names()

    def float_infos(self, index: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (tuple(info.shape), TORCH_DTYPES[info.dtype]) for name, info in self.bundle.passthrough_info(index).items()}

    def _layer(self, index: int):
        """Layer `index` decoded once while its tensors are written (one layer held at a time)."""
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, self.bundle.quantized_layer(index))
        return self._cached[1]

    def float_tensor(self, index: int, name: str) -> torch.Tensor:
        return self._layer(index)[1][name]

    def linear_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        return {name: tuple(info["shape"]) for name, info in self.bundle.manifest["layers"][index]["quantized"].items()}

    def linear(self, index: int, name: str) -> QuantizedWeight:
        return self._layer(index)[0][name]

    def linear_grid(self, index: int, name: str) -> dict:
        return self.bundle.tensor_quant(index, name)

    def expert_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        chunks = self.bundle.manifest["layers"][index].get("experts", {}).get("chunks", [])
        return {name: tuple(shape[-2:]) for name, shape in chunks[0]["shapes"].items()} if chunks else {}

    def expert_chunks(self, index: int, name: str):
        return self.bundle.expert_linear_chunks(index, name)


class FloatWeights:
    """The GGUF writer's view of an original float model: every linear is re-quantized, Q4_0 /
    Q4_1 / Q8_0 by gguf-py (llama.cpp's own round-to-nearest, the plain GGUF others would make),
    Q4_K by our min/max round-to-nearest (llama-quantize's Q4_K searches each block's range, so
    this baseline is weaker than llama.cpp's own Q4_K: docs/exports.md)."""

    quant = None

    def __init__(self, model_dir: Path, source=None):
        """`source`: the model already opened by streaming.open_source (its index checked)."""
        from maverick_quant.streaming import open_source

        self.source = source or open_source(model_dir)
        self.root, self.table, self.config = Path(model_dir), self.source.table, self.source.text_config
        self.num_layers, self.name = self.config.num_hidden_layers, Path(model_dir).name
        self.model_config = self.source.config  # the whole model's (a vision tower's too)

    def model_tensor_info(self, name: str) -> tuple[tuple[int, ...], torch.dtype] | None:
        info = self.source.checkpoint.tensors.get(name)
        return None if info is None else (tuple(info.shape), TORCH_DTYPES[info.dtype])

    def model_tensor(self, name: str) -> torch.Tensor:
        return self.source.checkpoint.get(name)

    def model_tensor_names(self) -> list[str]:
        return list(self.source.checkpoint.tensors)

    def _plan(self, index: int):
        return self.table.plan(self.config, index)

    def float_infos(self, index: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        prefix, infos = self.table.prefix(index), self.source.checkpoint.tensors
        return {name: (tuple(infos[prefix + name].shape), TORCH_DTYPES[infos[prefix + name].dtype])
                for name in self._plan(index).passthrough}

    def float_tensor(self, index: int, name: str) -> torch.Tensor:
        return self.source.checkpoint.get(self.table.prefix(index) + name)

    def linear_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        plan = self._plan(index)
        return {name: tuple(plan.shapes[f"{name}.weight"]) for name in plan.linears}

    def linear(self, index: int, name: str) -> torch.Tensor:
        return self.source.checkpoint.get(f"{self.table.prefix(index)}{name}.weight").float()

    def linear_grid(self, index: int, name: str) -> None:
        return None  # every linear is re-quantized to the export's type

    def expert_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        """Per-expert [N, K] of the gated MLP's linears (Llama 4 names), from the config."""
        if self._plan(index).moe is None:
            return {}
        inter, hidden = self.config.intermediate_size, self.config.hidden_size
        return {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}

    def expert_chunks(self, index: int, name: str):
        moe = self._plan(index).moe
        for first in range(moe.num_experts):  # one expert at a time: bounded memory
            yield first, unfuse_experts(moe, self.source.expert_tensors(index, first, 1))[name].float()
