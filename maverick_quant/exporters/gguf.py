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

What is read (a bundle, or a float model re-quantized) is in exporters/gguf_weights.py; the
metadata and vocabulary llama.cpp reads in exporters/gguf_metadata.py.

Writing streams: every tensor's info (name, shape, type, size) is known from the bundle's
manifest and headers, so the header is written first and then one tensor at a time (one
stacked expert tensor is the largest thing held, about 3 GB for a Maverick layer in Q4_0,
filled chunk by chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from maverick_quant.outputs import durable_replace, partial_name
from maverick_quant.compress.gguf_blocks import (BLOCK, BLOCK_TYPES, BlockType, block_type_for_grid, encode_blocks, grid_mismatch,
                                                relative_error, tensor_block_type)
from maverick_quant.compress.kquant import rtn_quantize_k
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.errors import InputError
from maverick_quant.exporters.gguf_metadata import (add_model_metadata, add_tokenizer, check_byte_level,
                                                    check_llama4_for_llama_cpp, rope_factors, tokenizer_pre)
from maverick_quant.exporters.gguf_weights import BundleWeights, FloatWeights

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
