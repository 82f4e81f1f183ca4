"""Bundle -> GGUF (llama.cpp), written with llama.cpp's own gguf-py, one tensor at a time.

Architectures: `llama` (dense) and `llama4` (the text model of Llama 4; the vision tower and
projector go to a second file, exporters/gguf_mmproj.py, as llama.cpp wants). Names follow llama.cpp:
    token_embd, output_norm, output, [rope_freqs],
    blk.N.attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
    blk.N.ffn_gate/up/down                      (dense MLP)
    blk.N.ffn_gate_inp (router, F32), ffn_{gate,up,down}_shexp, ffn_{gate,up,down}_exps [E, N, K]
For `llama`, q and k rows are permuted from Hugging Face's half-split rotary layout to
llama.cpp's interleaved pairs (a pure row permutation, applied to codes, scales and zeros).

Quantized linears are stored in the requested block type. When the bundle's grid is the
type's grid (see compress/gguf_blocks.py, `quantize --gguf-grid`), the codes and scales are
copied and the file dequantizes to the bundle bit for bit. Otherwise the export is refused,
unless `requantize` is set: then gguf-py re-quantizes the bundle's dequantized weights and the
relative error this adds is reported per tensor. Norms and the router are F32; embeddings and
the output head keep the checkpoint's float dtype.

Writing streams: every tensor's info (name, shape, type, size) is known from the bundle's
manifest and headers, so the header is written first and then one tensor at a time (one
stacked expert tensor is the largest thing held, about 3 GB for a Maverick layer in Q4_0,
filled chunk by chunk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from maverick_quant.arch.base import unfuse_experts
from maverick_quant.bundle import Bundle
from maverick_quant.checkpoint import TORCH_DTYPES
from maverick_quant.outputs import durable_replace, partial_name
from maverick_quant.compress.gguf_blocks import (BLOCK, BLOCK_TYPES, BlockType, block_type_for_grid, encode_blocks, grid_mismatch,
                                                relative_error, tensor_block_type)
from maverick_quant.compress.kquant import rtn_quantize_k
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.errors import InputError

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "feed_forward.gate_proj": "ffn_gate",
    "feed_forward.up_proj": "ffn_up",
    "feed_forward.down_proj": "ffn_down",
    "feed_forward.router.weight": "ffn_gate_inp",
    "feed_forward.router": "ffn_gate_inp",
    "feed_forward.shared_expert.gate_proj": "ffn_gate_shexp",
    "feed_forward.shared_expert.up_proj": "ffn_up_shexp",
    "feed_forward.shared_expert.down_proj": "ffn_down_shexp",
}
EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
ARCHITECTURES = {"llama": "llama", "llama4_text": "llama4", "llama4": "llama4"}
FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
F32_LAYER_TENSORS = ("attn_norm", "ffn_norm", "ffn_gate_inp")  # llama.cpp wants these in F32
FLOAT_GGUF_TYPES = ("F32", "F16")  # --gguf-type for a float GGUF (linears dequantized), llama-quantize's input


@dataclass
class TensorJob:
    """One GGUF tensor: name, logical shape [..., N, K], GGML type name, and how to make its data."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    load: Callable[[], np.ndarray]

    def byte_shape(self) -> tuple[int, ...]:
        if self.ggml_type in BLOCK_TYPES:
            return (*self.shape[:-1], BLOCK_TYPES[self.ggml_type].row_bytes(self.shape[-1]))
        return (*self.shape[:-1], self.shape[-1] * (4 if self.ggml_type == "F32" else 2))

    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape()))


@dataclass
class GGUFExport:
    """What an export did: tensors written, and the relative error of each re-quantized tensor."""

    path: Path
    tensors: int = 0
    requantized: dict[str, float] = field(default_factory=dict)


def rotary_row_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order [rows] taking HF's half-split rotary layout to llama.cpp's interleaved pairs:
    within each head of d rows, new row 2i + j is old row j * d/2 + i."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def permute_rows(weight: QuantizedWeight | torch.Tensor, order: torch.Tensor) -> QuantizedWeight | torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return weight[order]
    return weight.map_tensors(lambda t: t[order])


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


class GGUFPlan:
    """The tensors of one model (a bundle, or a float model) in one block type, in file order,
    with lazy loaders."""

    def __init__(self, weights: BundleWeights | FloatWeights, block_type: BlockType | str, requantize: bool,
                 report: GGUFExport):
        """`block_type` a BlockType, or a float type name ("F32", "F16"): every linear as its
        (dequantized) float values, the input llama.cpp's own `llama-quantize` expects."""
        self.weights, self.block_type, self.report, self.requantize = weights, block_type, report, requantize
        self.float_type = block_type if isinstance(block_type, str) else None
        self.config = weights.config
        self.arch = ARCHITECTURES.get(self.config.model_type)
        if self.arch is None:
            raise InputError(f"--format gguf: model_type {self.config.model_type!r} is not supported "
                             f"(supported: {sorted(ARCHITECTURES)})")
        if self.arch == "llama4":
            check_llama4_for_llama_cpp(self.config)
        if self.float_type:
            self.exact = True
            return
        mismatch = "a float model" if weights.quant is None else grid_mismatch(weights.quant, block_type)
        if mismatch and weights.quant is not None and not requantize:
            raise InputError(f"--gguf-type {block_type.name}: {mismatch}. Quantize with --gguf-grid {block_type.name} "
                             "for a lossless export, or pass --requantize to re-round (its error is reported)")
        self.exact = mismatch is None

    def jobs(self) -> list[TensorJob]:
        table = self.weights.table
        jobs = [self._model_job("token_embd.weight", table.embed)]
        factors = rope_factors(self.config)
        if factors is not None:
            jobs.append(TensorJob("rope_freqs.weight", tuple(factors.shape), "F32", lambda: factors.numpy()))
        for index in range(self.weights.num_layers):
            jobs.extend(self._layer_jobs(index))
        jobs.append(self._model_job("output_norm.weight", table.final_norm, "F32"))
        if self.weights.model_tensor_info(table.lm_head) is not None:
            jobs.append(self._model_job("output.weight", table.lm_head))
        return jobs

    def _model_job(self, gguf_name: str, name: str, ggml_type: str | None = None) -> TensorJob:
        shape, dtype = self.weights.model_tensor_info(name)
        ggml_type = ggml_type or FLOAT_TYPES.get(dtype, "F32")
        return TensorJob(gguf_name, shape, ggml_type, lambda: float_array(self.weights.model_tensor(name), ggml_type, gguf_name))

    def _layer_jobs(self, index: int) -> list[TensorJob]:
        weights, jobs = self.weights, []
        for name, (shape, dtype) in weights.float_infos(index).items():  # norms, routers, linears kept in float
            linear = name.removesuffix(".weight")
            gguf_name = self._gguf_name(index, name if name in LAYER_NAMES else linear)
            ggml_type = "F32" if gguf_name.split(".")[2] in F32_LAYER_TENSORS else FLOAT_TYPES[dtype]
            jobs.append(TensorJob(gguf_name, shape, ggml_type, lambda n=name, l=linear, t=ggml_type, g=gguf_name:
                                  float_array(self._rotary(l, weights.float_tensor(index, n)), t, g)))
        for name, shape in weights.linear_shapes(index).items():
            gguf_name = self._gguf_name(index, name)
            if gguf_name.split(".")[2] == "ffn_gate_inp":  # a quantized router: its values, in F32
                jobs.append(TensorJob(gguf_name, shape, "F32", lambda n=name: as_float(weights.linear(index, n)).numpy()))
                continue
            block_type, exact = self._linear_type(gguf_name, shape[-1], weights.linear_grid(index, name))
            ggml_type = block_type if isinstance(block_type, str) else block_type.name
            jobs.append(TensorJob(gguf_name, shape, ggml_type, lambda n=name, g=gguf_name, t=block_type, e=exact:
                                  self._encode(g, self._rotary(n, weights.linear(index, n)), t, e)))
        num_experts = getattr(self.config, "num_local_experts", 0)
        for name, (n, k) in weights.expert_shapes(index).items():
            gguf_name = f"blk.{index}.{EXPERT_NAMES[name]}.weight"
            jobs.append(TensorJob(gguf_name, (num_experts, n, k), self._tensor_type(k),
                                  lambda l=name, g=gguf_name, s=(num_experts, n, k):
                                  self._stack_experts(g, s, weights.expert_chunks(index, l))))
        return jobs

    def _stack_experts(self, gguf_name: str, shape: tuple[int, int, int], chunks) -> np.ndarray:
        """The stacked expert tensor's blocks [E, N, bytes], filled chunk by chunk (one copy held)
        from `chunks`, (first expert, weight [count, N, K]) pairs: each lands at its own first
        expert, and every expert must be filled exactly once."""
        experts, n, k = shape
        row_bytes = TensorJob(gguf_name, (k,), self._tensor_type(k), lambda: None).nbytes()
        out, filled = np.empty((experts, n, row_bytes), dtype=np.uint8), np.zeros(experts, dtype=bool)
        for first, weight in chunks:
            blocks = self._encode(gguf_name, weight, self._block_type(k), self.exact)
            if first + blocks.shape[0] > experts or filled[first : first + blocks.shape[0]].any():
                raise InputError(f"--format gguf: {gguf_name}: the bundle's expert chunk at {first} "
                                 f"({blocks.shape[0]} experts) overlaps another or passes the config's {experts}")
            out[first : first + blocks.shape[0]] = blocks.reshape(blocks.shape[0], n, row_bytes)
            filled[first : first + blocks.shape[0]] = True
        if not filled.all():
            raise InputError(f"--format gguf: {gguf_name}: the bundle holds {int(filled.sum())} experts, "
                             f"the config {experts}")
        return out

    def _gguf_name(self, index: int, name: str) -> str:
        if name not in LAYER_NAMES:
            raise InputError(f"--format gguf: layer {index} tensor {name!r} has no llama.cpp name")
        return f"blk.{index}.{LAYER_NAMES[name]}.weight"

    def _rotary(self, name: str, weight: QuantizedWeight | torch.Tensor) -> QuantizedWeight | torch.Tensor:
        if self.arch != "llama" or name not in ("self_attn.q_proj", "self_attn.k_proj"):
            return weight
        heads = self.config.num_attention_heads if name == "self_attn.q_proj" else self.config.num_key_value_heads
        return permute_rows(weight, rotary_row_permutation(weight.shape[-2], heads))

    def _block_type(self, in_features: int) -> BlockType | str:
        """The type of a linear on the bundle's own grid: the float type of a float export, else
        the export's block type (Q4_1 for a Q4_K export whose K is not a multiple of 256)."""
        return self.float_type or tensor_block_type(self.block_type, in_features)

    def _tensor_type(self, in_features: int) -> str:
        block_type = self._block_type(in_features)
        return block_type if isinstance(block_type, str) else block_type.name

    def _linear_type(self, gguf_name: str, in_features: int, grid: dict | None) -> tuple[BlockType | str, bool]:
        """(type, stored exactly) of a linear whose grid is `grid` (None: the bundle's). A bits
        override's grid (e.g. 8-bit attention in a 4-bit bundle) gets the llama.cpp type of its
        own width, per tensor (Q8_0 for 8 bits), as llama.cpp's own mixes do."""
        if self.float_type or grid is None or grid["bits"] == self.weights.quant["bits"]:
            return self._block_type(in_features), self.exact
        try:
            block_type = block_type_for_grid(grid)
        except ValueError as exc:
            raise InputError(f"--format gguf: {gguf_name}: {exc}") from None
        mismatch = grid_mismatch(grid, block_type)
        if mismatch and not self.requantize:
            raise InputError(f"--gguf-type {self.block_type.name}: {gguf_name} (a bits override's grid) is stored as "
                             f"{block_type.name}, but {mismatch}. Quantize with --gguf-grid for a lossless export, or "
                             "pass --requantize to re-round (its error is reported)")
        return block_type, mismatch is None

    def _encode(self, gguf_name: str, weight: QuantizedWeight | torch.Tensor, block_type: BlockType | str,
                exact: bool) -> np.ndarray:
        """The stored blocks of one tensor in `block_type`: exactly the bundle's codes when
        `exact`, else re-rounded by llama.cpp's rules (its error goes into the report)."""
        if isinstance(block_type, str):
            return float_array(as_float(weight), block_type, gguf_name).view(np.uint8)
        if exact:
            try:
                return encode_blocks(weight, block_type)
            except ValueError as exc:
                raise InputError(f"--gguf-type {self.block_type.name}: {gguf_name}: {exc}") from None
        import gguf

        reference = as_float(weight)
        if reference.shape[-1] % BLOCK:
            raise InputError(f"--gguf-type {self.block_type.name}: {gguf_name}: K={reference.shape[-1]} "
                             f"is not a multiple of {BLOCK}")
        qtype = getattr(gguf.GGMLQuantizationType, block_type.name)
        # gguf-py cannot quantize Q4_K: our round-to-nearest on its grid, packed by our packer
        blocks = (encode_blocks(rtn_quantize_k(reference), block_type) if block_type.k_quant
                  else gguf.quants.quantize(reference.numpy(), qtype))
        error = relative_error(torch.from_numpy(gguf.quants.dequantize(blocks, qtype)), reference)
        self.report.requantized[gguf_name] = max(error, self.report.requantized.get(gguf_name, 0.0))
        return blocks


def as_float(weight: QuantizedWeight | torch.Tensor) -> torch.Tensor:
    return weight.float() if isinstance(weight, torch.Tensor) else weight.dequantize()


def check_llama4_for_llama_cpp(config) -> None:
    """llama.cpp's llama4 graph fixes what Hugging Face configures: MoE on every
    `interleave_moe_layer_step`-th layer, no rope on every 4th layer, chunked attention of
    8192 tokens, attention temperature tuning on, and q/k L2 norms unless the model has 128
    experts. A GGUF of any other configuration would compute a different function: refused."""
    layers, step = config.num_hidden_layers, config.interleave_moe_layer_step
    expected = {
        "moe_layers": [i for i in range(layers) if step and (i + 1) % step == 0],
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(layers)],
        "layer_types": ["chunked_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)],
        "attention_chunk_size": 8192,
        "attn_temperature_tuning": True,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "use_qk_norm": config.num_local_experts != 128,
    }
    actual = {key: getattr(config, key, None) for key in expected}
    actual["moe_layers"] = list(actual["moe_layers"] or [])
    actual["no_rope_layers"] = list(actual["no_rope_layers"] or [])
    actual["layer_types"] = list(actual["layer_types"] or [])  # which layers attend in chunks (transformers reads it)
    actual["attn_temperature_tuning"] = bool(actual["attn_temperature_tuning"])  # configs write 4 for "on"
    wrong = [f"{key}={actual[key]!r} (llama.cpp: {value!r})" for key, value in expected.items() if actual[key] != value]
    if wrong:
        raise InputError("--format gguf: llama.cpp's llama4 cannot represent this model: " + "; ".join(wrong))


def float_array(tensor: torch.Tensor, ggml_type: str, name: str) -> np.ndarray:
    """A float tensor as the numpy array GGUFWriter stores for `ggml_type` (BF16 as raw bytes);
    InputError naming the tensor `name` when F16 cannot hold its values (|x| > 65504 became Inf)."""
    if ggml_type == "BF16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    array = tensor.to(torch.float16 if ggml_type == "F16" else torch.float32).contiguous().numpy()
    if ggml_type == "F16" and not np.isfinite(array).all():
        raise InputError(f"{name}: values of magnitude up to {float(tensor.abs().max()):.4g} exceed F16's 65504 and "
                         "would be stored as Inf; export as F32 (--gguf-type F32, or for the projector --mmproj-type F32; "
                         "in a recipe exports[].gguf_type / exports[].mmproj: F32)")
    return array


def rope_factors(config) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` [head_dim/2] for llama3-type rope scaling (None otherwise):
    the default inverse frequencies divided by the scaled ones, from transformers' own rope code."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise InputError(f"--format gguf: rope_type {rope_type!r} is not written yet (default and llama3 are)")
    if rope_type != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    dim = scaled.shape[0] * 2
    default = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return default / scaled  # in float32, as transformers and llama.cpp's converter compute both


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_model_metadata(writer, config, arch: str, block_type: BlockType, name: str) -> None:
    """The hyper-parameters llama.cpp reads for `arch` (keys as llama.cpp's converter writes them)."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(getattr(config, "intermediate_size_mlp", None) or config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if arch == "llama4":
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_interleave_moe_layer_step(config.interleave_moe_layer_step)
        writer.add_expert_feed_forward_length(config.intermediate_size)
    if isinstance(block_type, str):  # a float GGUF
        file_type = "ALL_F32" if block_type == "F32" else "MOSTLY_F16"
    else:  # Q4_K_S: Q4_K nearly everywhere
        file_type = "MOSTLY_Q4_K_S" if block_type.k_quant else f"MOSTLY_{block_type.name}"
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


_O200K_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
O200K_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _O200K_CONTRACTION
               + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _O200K_CONTRACTION
               + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama 4's (GPT-4o's o200k) split regex, exactly: llama.cpp replaces it by its own fixed
rules under the names "llama4" and "gpt-4o", so a tokenizer whose regex differs in any way
would be split otherwise in llama.cpp than in transformers."""


def tokenizer_pre(model_dir: Path) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, read from the structure of
    tokenizer.json's pre_tokenizer: ByteLevel with its regex alone is "gpt-2"; individual digits
    then ByteLevel is "smollm"; Llama 4's split regex (GPT-4o's o200k one, which llama.cpp
    splits alike under "llama4" and "gpt-4o"; exactly `O200K_SPLIT`, Isolated) then ByteLevel without its own regex
    is "llama4". None when not recognised (whatever the model's
    architecture: a Llama 4 layout may carry another tokenizer, upcycled from a Llama 3)."""
    pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(step.get("type"), step.get("individual_digits"), step.get("use_regex"), step.get("add_prefix_space"))
             for step in steps]
    if kinds == [("ByteLevel", None, True, False)]:
        return "gpt-2"
    if kinds == [("Digits", True, None, None), ("ByteLevel", None, True, False)]:
        return "smollm"
    split = steps[0] if steps and steps[0].get("type") == "Split" else {}
    if (len(steps) == 2 and (split.get("pattern") or {}).get("Regex") == O200K_SPLIT
            and split.get("behavior") == "Isolated" and split.get("invert") is False
            and kinds[1][0] == "ByteLevel" and kinds[1][2] is False):
        return "llama4"
    return None


def check_byte_level(model_dir: Path) -> None:
    """InputError unless tokenizer.json is a byte-level BPE (GPT-2 style: ByteLevel decoding,
    no byte fallback), the only vocabulary `add_tokenizer` writes right: a SentencePiece-style
    BPE (`▁` spaces, <0x0A> byte tokens) needs llama.cpp's `llama` vocabulary instead."""
    data = json.loads((model_dir / "tokenizer.json").read_text())
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    if model.get("type") != "BPE" or model.get("byte_fallback") or not any(d.get("type") == "ByteLevel" for d in decoders):
        raise InputError(f"{model_dir}/tokenizer.json: model {model.get('type')!r} (byte_fallback "
                         f"{bool(model.get('byte_fallback'))}), decoder {decoder.get('type')!r}; --format gguf writes "
                         "byte-level BPE vocabularies only (GPT-2 style: a ByteLevel decoder, no byte fallback)")


def add_tokenizer(writer, model_dir: Path, vocab_size: int, pre: str) -> None:
    """Byte-level BPE vocabulary (tokens, types, merges, special ids, chat template)."""
    import gguf
    from maverick_quant.calibration.data import load_tokenizer

    tokenizer = load_tokenizer(model_dir)  # tokenizer.json checked by plan_gguf_export
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise InputError(f"{model_dir}: the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def plan_gguf_export(weights: BundleWeights | FloatWeights, gguf_type: str, requantize: bool = False,
                     pre: str | None = None, report: GGUFExport | None = None) -> tuple["GGUFPlan", str, list[TensorJob]]:
    """(plan, llama.cpp pre-tokenizer name, tensor jobs) of a GGUF export, everything it refuses
    checked from headers and config alone (nothing is read or written)."""
    if gguf_type not in BLOCK_TYPES and gguf_type not in FLOAT_GGUF_TYPES:
        raise InputError(f"--gguf-type {gguf_type}: expected one of {sorted(BLOCK_TYPES) + list(FLOAT_GGUF_TYPES)}")
    plan = GGUFPlan(weights, BLOCK_TYPES.get(gguf_type, gguf_type), requantize, report or GGUFExport(Path()))
    if not (weights.root / "tokenizer.json").is_file():
        raise InputError(f"{weights.root}: --format gguf needs tokenizer.json (a Hugging Face fast tokenizer)")
    check_byte_level(weights.root)
    pre = pre or tokenizer_pre(weights.root)
    if pre is None:
        raise InputError(f"{weights.root}/tokenizer.json: pre-tokenizer not recognised; name llama.cpp's with --gguf-pre "
                         "(e.g. gpt-2, smollm, llama-bpe for Llama 3, llama4)")
    jobs = plan.jobs()
    for job in jobs:
        if job.ggml_type in BLOCK_TYPES and job.shape[-1] % BLOCK:
            raise InputError(f"--gguf-type {gguf_type}: {job.name} has K={job.shape[-1]}, not a multiple of {BLOCK}")
    return plan, pre, jobs


def export_gguf(weights: BundleWeights | FloatWeights, out_path: Path, gguf_type: str, requantize: bool = False,
                pre: str | None = None, show_progress: bool = True) -> GGUFExport:
    """Write a bundle (or, re-quantized by gguf-py, a float model) as a GGUF file at `out_path`
    (written under a temporary name, renamed when complete)."""
    import gguf

    report = GGUFExport(Path(out_path))
    plan, pre, jobs = plan_gguf_export(weights, gguf_type, requantize, pre, report)
    writer = gguf.GGUFWriter(path=None, arch=plan.arch)
    add_model_metadata(writer, plan.config, plan.arch, plan.block_type, weights.name)
    add_tokenizer(writer, weights.root, plan.config.vocab_size, pre)
    report.tensors = write_gguf_file(writer, jobs, Path(out_path), f"export gguf {gguf_type}", show_progress)
    return report


def write_gguf_file(writer, jobs: list[TensorJob], out_path: Path, desc: str, show_progress: bool = True) -> int:
    """Write a GGUF whose metadata is in `writer`: the header and every tensor's info first, then
    one tensor at a time as `jobs` make them, under a temporary name renamed when complete.
    Returns the number of tensors written."""
    import gguf

    for job in jobs:
        writer.add_tensor_info(job.name, job.byte_shape(), np.dtype(np.uint8), job.nbytes(),
                               raw_dtype=getattr(gguf.GGMLQuantizationType, job.ggml_type))
    tmp = partial_name(out_path)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(job.nbytes() for job in jobs), desc=desc, unit="B", unit_scale=True,
                  disable=not show_progress) as bar:
            for job in jobs:
                data = np.ascontiguousarray(job.load()).view(np.uint8)
                if data.nbytes != job.nbytes():
                    raise InputError(f"{desc}: {job.name}: {data.nbytes} bytes made, {job.nbytes()} announced")
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
        writer.close()
        durable_replace(tmp, out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return len(jobs)
