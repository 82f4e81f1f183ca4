"""Run a decoder-only model one layer at a time over cached hidden states.

Only the embedding rows being looked up, one decoder layer and the hidden states of the
windows are in memory (and, while GPTQ solves a layer, its attention's kept output-projection
inputs: attention_replay.py). A layer is transformers' own decoder-layer class, built on the meta
device and given the layer's tensors (no re-implemented attention). Quantize and validate
share this engine through the `WeightSource` protocol: the original checkpoint, a bundle
and an export all provide float tensors layer by layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from maverick_quant.arch.base import ArchTable
from maverick_quant.checkpoint import Checkpoint, manifest_format
from maverick_quant.compress.finite import all_finite
from maverick_quant.errors import ContentError, InputError


class StopForward(Exception):
    """Raised by a hook to end a layer's forward once the inputs it needed were seen."""


class WeightSource(Protocol):
    """Float tensors of a model, one decoder layer at a time."""

    table: ArchTable
    config: Any

    def layer_tensors(self, index: int, experts: bool = True) -> dict[str, torch.Tensor]:
        """Tensors of layer `index`, keyed by name relative to the layer ("mlp.up_proj.weight");
        without the fused routed-expert tensors when `experts` is False."""

    def model_tensor(self, name: str) -> torch.Tensor:
        """A model-level tensor (embed, final norm, lm_head; lm_head resolves ties)."""

    def embedding_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (sorted, unique token ids [U]) of the input embedding -> [U, D]."""

    def expert_tensors(self, index: int, first: int, count: int) -> dict[str, torch.Tensor]:
        """Routed experts [first, first+count) of MoE layer `index` as the model's fused
        tensors {relative name: [count, ...]}, reading no other expert."""


def require_finite_hidden(hidden: torch.Tensor, index: int, whose: str) -> None:
    """ContentError when the hidden states `hidden` [..., D] leaving layer `index` hold NaN or
    Inf (finite weights whose activations overflow fp32): every later layer, statistic and
    score would be computed on them. `whose` opens the message ("the reference's")."""
    if not all_finite(hidden):
        raise ContentError(f"{whose} hidden states became NaN/Inf at the output of layer {index}; check the model's "
                           "weights there")


def layer_tensor_names(table: ArchTable, text_config: Any, index: int, experts: bool) -> list[str]:
    """Relative names of layer `index`'s tensors, the fused expert tensors only if `experts`."""
    plan = table.plan(text_config, index)
    skipped = set(plan.moe.fused_names) if plan.moe and not experts else set()
    return [name for name in plan.shapes if name not in skipped]


class CheckpointModelTensors:
    """Model-level tensors of a source backed by a `Checkpoint` (`self.checkpoint`, `self.table`);
    a tied lm_head resolves to the embedding."""

    def model_tensor(self, name: str) -> torch.Tensor:
        if name == self.table.lm_head and name not in self.checkpoint.tensors:
            name = self.table.embed
        return self.checkpoint.get(name)

    def embedding_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.get_rows(self.table.embed, rows)


class CheckpointSource(CheckpointModelTensors):
    """The original model read lazily from its safetensors shards."""

    def __init__(self, checkpoint: Checkpoint, table: ArchTable, config: Any):
        self.checkpoint, self.table, self.config = checkpoint, table, config
        self.text_config = table.text_config(config)

    def check_head(self) -> None:
        """Read the final norm and the lm_head once (a readable dtype, finite: `Checkpoint.get`)
        and drop them: they are used after the last layer, where a bad one would throw away a
        whole validation pass (quantize reads every model-level tensor so up front)."""
        for name in (self.table.final_norm, self.table.lm_head):
            self.model_tensor(name)
        check_tied_head(self)

    def layer_tensors(self, index: int, experts: bool = True) -> dict[str, torch.Tensor]:
        prefix = self.table.prefix(index)
        return {name: self.checkpoint.get(prefix + name)
                for name in layer_tensor_names(self.table, self.text_config, index, experts)}

    def expert_tensors(self, index: int, first: int, count: int) -> dict[str, torch.Tensor]:
        """Experts [first, first+count) of layer `index`: {fused relative name: [count, K, parts*N]},
        read as one contiguous slice of each fused tensor (never the whole layer's experts)."""
        prefix, moe = self.table.prefix(index), self.table.plan(self.text_config, index).moe
        rows = torch.arange(first, first + count)
        return {name: self.checkpoint.get_rows(prefix + name, rows) for name in moe.fused_names}


@dataclass(frozen=True)
class SequenceLayout:
    """Several sequences sharing a prefix, packed into each row of a cache [S, L].

    positions [S, L]: the rotary position of each token (a branch continues from the end of
    the shared prefix, so it sees exactly the positions it would have alone).
    segments [S, L]: 0 for the shared prefix, k > 0 for the k-th branch, -1 for padding.
    Token q attends to token k iff k <= q and (segments[k] == 0 or segments[k] == segments[q]):
    every branch computes what it would compute as its own sequence prefix + branch.
    (Llama 4's NoPE temperature tuning reads array positions, floor((p + 1) / floor_scale):
    equal to the branch's own positions only for rows shorter than floor_scale tokens, so
    `StreamingModel.apply` refuses longer packed rows; `packed_row_limit` gives the bound.)
    """

    positions: torch.Tensor
    segments: torch.Tensor

    @staticmethod
    def packed_row_limit(config) -> int | None:
        """The longest packed row a text `config` computes right (None: no bound): shorter than
        floor_scale when NoPE temperature tuning is on (it reads array positions)."""
        if getattr(config, "attn_temperature_tuning", False) and getattr(config, "floor_scale", None):
            return int(config.floor_scale) - 1
        return None

    def attention_mask(self, rows: slice, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """Additive mask [B, 1, L, L] for the rows `rows` (0 allowed, -inf masked), on `device`."""
        segments = self.segments[rows].to(device)
        length = segments.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        query, key = segments[:, :, None], segments[:, None, :]
        allowed = causal & ((key == 0) | (key == query))
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        return mask[:, None]


class StreamingModel:
    """Layer-by-layer forward of a `WeightSource` in `dtype` (fp32 by default) on `device`.

    Shapes: input_ids [S, L] -> hidden [S, L, D] -> logits [S, L, V]; windows are processed
    `batch` at a time; causal attention via SDPA with no padding (all windows full length),
    or, with a `layout`, several prefix-sharing sequences packed per row (see SequenceLayout).
    Layers live on `device`; the hidden states stay wherever the caller keeps them (host
    memory: see devices.py) and each batch of windows is moved to `device` to be computed.
    A quantized source (a bundle or packed export: `dequantizes`) is read through
    `layer_tensors` / `expert_tensors`, which have it dequantize on `device`: its integer
    codes cross to the device rather than fp32 weights.
    `layout` describes the cache being run and may be switched between caches that share a
    built layer (validation.evaluate.forward_layer_blocks).
    """

    def __init__(self, source: WeightSource, dtype: torch.dtype = torch.float32, batch: int = 8,
                 layout: SequenceLayout | None = None, device: torch.device | str = "cpu"):
        self.source, self.table = source, source.table
        self.config = source.table.text_config(source.config)
        self.config._attn_implementation = "sdpa"
        self.dtype, self.batch, self.layout, self.device = dtype, batch, layout, torch.device(device)
        self.rotary = self.table.build_rotary(self.config).to(device=self.device)  # inv_freq stays fp32, as in transformers
        self._final = None
        self._reads_on = {"device": self.device} if getattr(source, "dequantizes", False) else {}

    def layer_tensors(self, index: int, experts: bool = True) -> dict[str, torch.Tensor]:
        """The source's tensors of layer `index` (a quantized source dequantizes on this model's device)."""
        return self.source.layer_tensors(index, experts, **self._reads_on)

    def expert_tensors(self, index: int, first: int, count: int) -> dict[str, torch.Tensor]:
        """The source's fused routed experts [first, first + count) of layer `index` (dequantized
        on this model's device by a quantized source)."""
        return self.source.expert_tensors(index, first, count, **self._reads_on)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[S, L] token ids -> [S, L, D] hidden states, reading only the rows used. The rows are
        cast first, so no [S, L, D] copy in the checkpoint's dtype sits beside the result (it
        added half the fp32 cache to the peak for a bf16 checkpoint)."""
        unique, inverse = input_ids.unique(sorted=True, return_inverse=True)
        return torch.nn.functional.embedding(inverse, self.source.embedding_rows(unique).to(self.dtype))

    def plan(self, index: int):
        return self.table.plan(self.config, index)

    def layer(self, index: int, tensors: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """Decoder layer `index` with its float tensors (from the source unless given).

        `tensors` may leave out the fused routed-expert tensors (they then stay on the meta
        device: the quantize path runs experts itself, chunk by chunk); anything else missing
        is an error. The module gets `attention_window` from the plan (None: plain causal).
        """
        plan = self.plan(index)
        module = self.table.build_layer(self.config, index)
        tensors = self.layer_tensors(index) if tensors is None else tensors
        result = module.load_state_dict({k: v.to(self.device, self.dtype) for k, v in tensors.items()},
                                        strict=False, assign=True)
        optional = set(plan.moe.fused_names) if plan.moe else set()
        missing = [key for key in result.missing_keys if key not in optional]
        if missing or result.unexpected_keys:
            raise ValueError(f"layer {index}: missing tensors {missing}, unexpected {result.unexpected_keys}")
        module.attention_window = plan.attention_window
        module.storage_dtype = next(iter(tensors.values())).dtype  # what pass-through tensors are written as
        return module.eval()

    def _position_embeddings(self, hidden: torch.Tensor, rows: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layout is not None:
            return self.rotary(hidden, self.layout.positions[rows].to(hidden.device))
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)
        return self.rotary(hidden, positions)

    @contextlib.contextmanager
    def eager_attention(self) -> Iterator[None]:
        """Within the block, attention runs transformers' eager path, which returns the
        attention probabilities (for hooks that need them), with an explicit causal mask."""
        previous = self.config._attn_implementation
        self.config._attn_implementation = "eager"
        try:
            yield
        finally:
            self.config._attn_implementation = previous

    def _attention_mask(self, chunk: torch.Tensor, window: int | None) -> torch.Tensor | None:
        """Additive mask [1, 1, L, L]: causal, and within chunks of `window` tokens for chunked
        attention (query i sees key j iff j <= i and i // window == j // window). None where
        SDPA's own causal mask is exact (no eager hooks, no chunk boundary inside the window)."""
        length = chunk.shape[1]
        chunked = window is not None and window < length
        if self.config._attn_implementation != "eager" and not chunked:
            return None
        positions = torch.arange(length, device=chunk.device)
        allowed = positions[None, :] <= positions[:, None]
        if chunked:
            allowed &= (positions[None, :] // window) == (positions[:, None] // window)
        mask = torch.zeros(length, length, dtype=chunk.dtype, device=chunk.device).masked_fill_(~allowed, float("-inf"))
        return mask[None, None]

    @torch.no_grad()
    def apply(self, layer: torch.nn.Module, chunk: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """One layer on a batch of full-length windows [B, L, D] -> [B, L, D] on the model's
        device; `rows` says which rows of the cache `chunk` is (needed with a packed `layout`)."""
        chunk = chunk.to(self.device)
        window = getattr(layer, "attention_window", None)
        limit = SequenceLayout.packed_row_limit(self.config)
        if self.layout is None:
            mask = self._attention_mask(chunk, window)
        elif rows is None or (window is not None and window < chunk.shape[1]) or (limit and chunk.shape[1] > limit):
            raise ValueError("a packed layout needs the chunk's rows, and rows shorter than the attention window and "
                             f"than the temperature tuning's floor_scale (rows of {chunk.shape[1]} tokens)")
        else:
            mask = self.layout.attention_mask(rows, chunk.dtype, chunk.device)
        return layer(chunk, attention_mask=mask, position_embeddings=self._position_embeddings(chunk, rows))

    @torch.no_grad()
    def run_layer(self, layer: torch.nn.Module, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Apply `layer` to every window of `hidden` [S, L, D], `batch` windows at a time.

        Writes into `out` (may be `hidden` itself: each window depends only on itself) and
        returns it; allocates a new tensor when `out` is None.
        """
        out = torch.empty_like(hidden) if out is None else out
        for start in range(0, hidden.shape[0], self.batch):
            rows = slice(start, start + self.batch)
            out[rows] = self.apply(layer, hidden[rows], rows)
        return out

    def eager_batch(self, length: int, budget_bytes: int = 32 * 2**20) -> int:
        """Windows per batch under eager attention, whose probabilities [B, heads, L, L]
        (materialised several times by the eager path) should stay within `budget_bytes`."""
        per_window = self.config.num_attention_heads * length * length * torch.finfo(self.dtype).bits // 8
        return max(1, min(self.batch, budget_bytes // per_window))

    @torch.no_grad()
    def feed_layer(self, layer: torch.nn.Module, hidden: torch.Tensor, batch: int | None = None) -> None:
        """Run `layer` over `hidden` for its hooks' sake only, `batch` windows at a time
        (default `self.batch`); outputs are discarded and a hook may end each batch early by
        raising `StopForward`."""
        batch = batch or self.batch
        for start in range(0, hidden.shape[0], batch):
            rows = slice(start, start + batch)
            try:
                self.apply(layer, hidden[rows], rows)
            except StopForward:
                pass

    def _final_modules(self) -> tuple[torch.nn.Module, torch.Tensor]:
        if self._final is None:
            norm = self.table.build_norm(self.config)
            norm.weight.data = self.source.model_tensor(self.table.final_norm).to(self.device, self.dtype)
            self._final = (norm, self.source.model_tensor(self.table.lm_head).to(self.device, self.dtype))
        return self._final

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] last hidden states -> [..., V] fp32 logits (final norm, then lm_head),
        computed on the model's device and returned where `hidden` is."""
        norm, lm_head = self._final_modules()
        return (norm(hidden.to(self.device)) @ lm_head.T).float().to(hidden.device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Whole-model logits [S, L, V], layer by layer (for tests and small models)."""
        hidden = self.embed(input_ids)
        for index in range(self.num_layers):
            self.run_layer(self.layer(index), hidden, out=hidden)
        return self.logits(hidden)


def _refuse_our_artifact(model_dir: Path) -> None:
    """InputError when `model_dir` is a bundle or an export of ours (its manifest.json names its
    format), given where the original float model is expected: its tensors would be listed as
    missing one by one."""
    found = manifest_format(model_dir)
    if found is not None:
        raise InputError(f"{model_dir}: a maverick-quant {found} (its manifest.json says so), not the original float "
                         "model this option reads")


def open_source(model_dir) -> CheckpointSource:
    """Open a model directory, check the whole index against its architecture table, and wrap it.

    Raises InputError (naming the file or tensor) for unsupported architectures, pickle-only
    checkpoints, truncated or missing shards, and tensors whose shape disagrees with config.json.
    """
    from maverick_quant.arch.registry import table_for

    _refuse_our_artifact(Path(model_dir))
    checkpoint = Checkpoint(model_dir)
    config = checkpoint.load_config()
    table = table_for(config, str(checkpoint.model_dir / "config.json"))
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    expected = table.expected_tensors(config)
    with _said_quantized(checkpoint, config):
        checkpoint.validate(expected, declared)
        _refuse_unread_tensors(checkpoint, table, expected)
    return CheckpointSource(checkpoint, table, config)


@contextlib.contextmanager
def _said_quantized(checkpoint: Checkpoint, config):
    """A checkpoint whose tensors do not match the float model config.json describes, and
    whose config.json declares it quantized (Meta's FP8 Maverick, a GPTQ / AWQ /
    compressed-tensors export: codes and scales, not float weights), is refused saying so first
    (the dtype and missing-tensor complaints never said why). A quantization_config over the
    float tensors expected (a model dequantized from GGUF by transformers keeps quant_method
    gguf) is accepted: the tensors are what is read (and their faults are not called quantized)."""
    try:
        yield
    except InputError as exc:
        quantization = getattr(config, "quantization_config", None)
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "?")
        if not quantization or method == "gguf":
            raise
        raise InputError(f"{checkpoint.model_dir / 'config.json'}: the model is quantized already (quantization_config, "
                         f"quant_method {method}); maverick-quant quantizes a float checkpoint: use the BF16/FP16 "
                         f"release (or dequantize it first). {exc}") from None


# buffers some checkpoints carry that every loader recomputes from config.json
RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq",)


def _refuse_unread_tensors(checkpoint: Checkpoint, table: ArchTable, expected: dict) -> None:
    """InputError naming the tensors the run would drop without a word: layers past
    num_hidden_layers, biases config.json does not declare, any other name the architecture
    table does not read (and no pass-through prefix covers). A head stored beside
    tie_word_embeddings is left to `check_tied_head` (it reads data; this reads headers)."""
    lm_head = table.lm_head
    unread = sorted(name for name in checkpoint.tensors if name not in expected and name != lm_head
                    and not name.startswith(table.passthrough_prefixes) and not name.endswith(RECOMPUTED_BUFFERS))
    if unread:
        shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        raise InputError(f"{checkpoint.model_dir}: {len(unread)} tensors that config.json does not describe would be "
                         f"dropped: {shown} (num_hidden_layers, attention_bias / mlp_bias, or another architecture?)")


def check_tied_head(source: "CheckpointSource") -> None:
    """InputError when config.json ties the output head to the embedding (tie_word_embeddings)
    yet the checkpoint stores a head that differs from it: engines would serve the embedding,
    while this tool quantizes and validates the stored head. An equal one is fine. Reads both
    tensors: called where they are read anyway (quantize's and validate's up-front checks)."""
    head, embed = source.table.lm_head, source.table.embed
    tied = head not in source.table.model_shapes(source.text_config)
    if tied and head in source.checkpoint.tensors and not torch.equal(source.checkpoint.get(head),
                                                                       source.checkpoint.get(embed)):
        raise InputError(f"{source.checkpoint.model_dir}: config.json ties the output head to the embedding "
                         f"(tie_word_embeddings), but {head!r} is stored and differs from {embed!r}: engines would run "
                         "the embedding, this tool the stored head; set tie_word_embeddings to false (or drop the "
                         "stored head)")
