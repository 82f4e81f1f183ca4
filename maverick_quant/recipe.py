"""Frozen, validated configuration objects shared by every stage.

Each dataclass validates itself in `__post_init__` and raises `InputError` naming the
option and the allowed values, so a bad CLI flag or recipe key fails before any work.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass

from maverick_quant.errors import InputError


class Method(str, enum.Enum):
    """Weight quantization algorithm."""

    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"
    AWQ_GPTQ = "awq+gptq"

    @property
    def searches_scales(self) -> bool:
        """Whether the method runs AWQ's scale (and clip) searches before quantizing."""
        return self in (Method.AWQ, Method.AWQ_GPTQ)

    @property
    def solves_gptq(self) -> bool:
        """Whether the method's weights come from GPTQ's solve against the inputs' Hessian."""
        return self in (Method.GPTQ, Method.AWQ_GPTQ)


ALLOWED_GROUP_SIZES = (-1, 32, 64, 128, 256)


# Multiple-choice hidden states (MiB, fp32) streamed through the layers per pass over the weights: at Maverick's
# hidden 5120 a HellaSwag task (4 endings packed beside the context, ~168 tokens) holds ~3.3 MiB (docs/validation.md).
CHOICES_PASS_MIB = 8192
# Kernel backends that run 4-bit weights (compress/kernels/backends.py); "auto" picks the best here.
KERNEL_BACKENDS = ("auto", "reference", "cpu-int4", "triton", "cuda")
MMPROJ_TYPES = ("F16", "F32", "Q8_0")  # llama.cpp projector (mmproj) files: the type of their matrices
# Weight grids that llama.cpp block types store exactly (see compress/gguf_blocks.py).
GGUF_GRIDS = {
    "Q4_0": {"bits": 4, "group_size": 32, "sym": True, "signed_scale": True},
    "Q4_1": {"bits": 4, "group_size": 32, "sym": False, "free_min": True},
    "Q8_0": {"bits": 8, "group_size": 32, "sym": True},
    # super-blocks of 256 columns; a matrix whose K is not a multiple of 256 gets the Q4_1 grid
    "Q4_K": {"bits": 4, "group_size": 32, "sym": False, "k_quant": True},
}


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized.

    bits:        code width, 2..8.
    group_size:  input columns sharing one (scale, zero); -1 = one group per output row.
                 When it does not divide K the last group is shorter (K=576, G=128 -> 5 groups).
    sym:         symmetric grid (zero fixed at 2^(bits-1)) or asymmetric (zero per group).
    act_order:   GPTQ solves columns in order of decreasing diag(H). Groups are always
                 static (computed on the original column order) so g_idx stays trivial.
    damp:        GPTQ relative damping: H + damp * mean(diag(H)) * I (raised on failure).
    block_size:  GPTQ lazy-update block width.
    scale_bits:  significant bits kept in each fp16 scale (11: any fp16). With 7, -zero * scale
                 is itself an fp16 number for every 4-bit zero, so an asymmetric 4-bit grid of
                 group 32 can also be stored as llama.cpp's Q4_1 (d = scale, m = -zero * scale).
    free_min:    llama.cpp Q4_1's own grid (4-bit, asymmetric, group 32): value = code * d + m
                 with a free fp16 d and m per group, m the group's minimum (the range need not
                 contain 0); see compress/kquant.py. Only GGUF Q4_1 stores it.
    k_quant:     llama.cpp's Q4_K grid (4-bit, asymmetric, group 32): each super-block of 256
                 columns has fp16 (d, dmin) and every group 6-bit multipliers (sc, m), value =
                 code * d * sc - dmin * m (see compress/kquant.py). Matrices whose K is not a
                 multiple of 256 get the free_min Q4_1 grid and are stored as GGUF Q4_1.
    signed_scale: (symmetric grids) llama.cpp's Q4_0 scale rule: scale = m / -2^(bits-1), m
                 the group's weight of largest magnitude, so m is exactly code 0 and the step
                 is max|w| / 8 at 4 bits (min/max's is max|w| / 7.5, and its extreme weight
                 is clipped by half a step); the scale is negative when m > 0. Set by
                 `--gguf-grid Q4_0`; 23% less round-to-nearest weight error on SmolLM2.
    clip_search: (group grids) search each group's range instead of taking its min/max:
                 the range shrunk by p = 1 - i/100 for i < 80, keeping the p with the least
                 sum_k |w_k - q(w_k)|^2.4 over the group (GPTQ's reference `mse` search, as
                 GPTQModel's `mse=2.4`). In GPTQ each column's term is weighted by its input's
                 energy H_kk = E[x_k^2] (as llama.cpp weights its search by an imatrix), and the
                 search runs when the solve reaches the group, on the error-updated weights:
                 SmolLM2 GPTQ g128 KL 0.193 -> 0.145 with signed_scale (docs/results.md). RTN
                 has no activations, so its search is unweighted. llama.cpp's Q4_K/Q4_1 grids
                 search their own ranges.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    scale_bits: int = 11
    k_quant: bool = False
    free_min: bool = False
    signed_scale: bool = False
    clip_search: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise InputError(f"bits={self.bits}: expected an integer from 2 to 8")
        if self.group_size not in ALLOWED_GROUP_SIZES:
            raise InputError(
                f"group_size={self.group_size}: expected one of {', '.join(map(str, ALLOWED_GROUP_SIZES))}"
            )
        if not 0.0 < self.damp < 1.0:
            raise InputError(f"damp={self.damp}: expected a fraction in (0, 1), e.g. 0.01")
        if self.block_size < 1:
            raise InputError(f"block_size={self.block_size}: expected a positive integer")
        if not 1 <= self.scale_bits <= 11:
            raise InputError(f"scale_bits={self.scale_bits}: expected 1 to 11 (fp16 has 11 significant bits)")
        if self.signed_scale and not self.sym:
            raise InputError("signed_scale (llama.cpp Q4_0's scale rule) needs a symmetric grid; got sym false")
        if self.clip_search and self.gguf_grid:
            raise InputError(f"clip_search: llama.cpp's {self.gguf_grid} grid chooses its ranges by its own search; "
                             "use it on the (scale, zero) group grids (e.g. --gguf-grid Q4_0, or --bits/--group-size)")
        for flag, grid in (("k_quant", "Q4_K"), ("free_min", "Q4_1")):
            if getattr(self, flag) and (self.bits, self.group_size, self.sym) != (4, 32, False):
                raise InputError(f"{flag} (llama.cpp {grid}'s grid) is bits 4, group_size 32, sym false; got bits "
                                 f"{self.bits}, group_size {self.group_size}, sym {self.sym}")

    @property
    def gguf_grid(self) -> str | None:
        """The llama.cpp type whose own offset grid this spec solves on ("Q4_K", "Q4_1"), or None."""
        return offset_grid_name({"k_quant": self.k_quant, "free_min": self.free_min})

    def with_bits(self, bits: int) -> "QuantSpec":
        """This grid at another code width (a bits override). llama.cpp's offset grids (Q4_K,
        Q4_1's own) exist at 4 bits only: from them the symmetric grid of group 32 is taken
        (8 bits: Q8_0's grid, 4 bits: Q4_0's), which GGUF stores per tensor beside them."""
        if bits == self.bits:
            return self
        if self.gguf_grid:
            return dataclasses.replace(self, bits=bits, sym=True, k_quant=False, free_min=False, scale_bits=11)
        return dataclasses.replace(self, bits=bits, signed_scale=False)  # Q4_0's rule; 8 bits: Q8_0's min/max grid

    @property
    def maxq(self) -> int:
        """Largest integer code, 2^bits - 1."""
        return (1 << self.bits) - 1

    def groups_for(self, in_features: int) -> int:
        """Number of groups along an input dimension of size `in_features`."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def group_width(self, in_features: int) -> int:
        """Columns per group (the last group may be shorter)."""
        return in_features if self.group_size == -1 else self.group_size


def parse_bits_override(entry: str) -> tuple[str, int]:
    """"REGEX=BITS" (a bits override, e.g. "self_attn=8") -> (REGEX, BITS); InputError otherwise."""
    pattern, separator, bits = entry.rpartition("=")
    if not separator or not pattern or not bits.strip().isdecimal() or not bits.strip().isascii() or len(bits.strip()) > 2:
        raise InputError(f"bits_overrides entry {entry!r}: expected REGEX=BITS, e.g. 'self_attn=8'")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InputError(f"bits_overrides entry {entry!r}: {pattern!r} is not a regular expression ({exc})") from None
    if not 2 <= int(bits) <= 8:
        raise InputError(f"bits_overrides entry {entry!r}: expected bits from 2 to 8, got {int(bits)}")
    return pattern, int(bits)


def grid_changes(grid: QuantSpec, base: QuantSpec) -> dict:
    """The fields of `grid` that differ from `base` (a bits override's record in a bundle)."""
    base_fields = dataclasses.asdict(base)
    return {key: value for key, value in dataclasses.asdict(grid).items() if base_fields[key] != value}


def offset_grid_name(quant: dict) -> str | None:
    """"Q4_K" / "Q4_1" when a grid dict (QuantSpec's fields, e.g. a bundle's recipe weights) is on
    one of llama.cpp's own offset grids, else None."""
    return "Q4_K" if quant.get("k_quant") else "Q4_1" if quant.get("free_min") else None


@dataclass(frozen=True)
class AWQSpec:
    """Activation-aware scale and clip search (see compress/awq.py).

    grid:        ratios alpha = i / grid, i = 0..grid-1, tried for s = mean|x|^alpha.
    duo_scaling: s = mean|x|^alpha / mean|w|^(1 - alpha) instead.
    clip:        also search a per-(row, group) clipping range after scaling; None: by method
                 (QuantizeSpec sets it): on for awq, off for awq+gptq, whose GPTQ then solves
                 against the scaled weights themselves, not clipped ones (llm-compressor's
                 AWQ+GPTQ does not clip either; docs/awq.md has the measurement).
    clip_grid, max_shrink: clip ranges max|w| * (1 - i / clip_grid) for i < max_shrink * clip_grid.
    sample_tokens: calibration tokens sampled (evenly) for the scale and clip losses.
    """

    grid: int = 20
    duo_scaling: bool = False
    clip: bool | None = None
    clip_grid: int = 20
    max_shrink: float = 0.5
    sample_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.grid < 1 or self.clip_grid < 1 or self.sample_tokens < 1:
            raise InputError("awq.grid, awq.clip_grid and awq.sample_tokens: expected positive integers")
        if not 0.0 <= self.max_shrink < 1.0:
            raise InputError(f"awq.max_shrink={self.max_shrink}: expected a fraction in [0, 1)")


WINDOW_DRAWS = ("random", "disjoint")
MAX_COUNT = 2**31 - 1  # windows, tokens per window: beyond it a count is a typo, and torch's generators overflow


@dataclass(frozen=True)
class CalibSpec:
    """How calibration windows are drawn from a text source.

    windows: `random` starts anywhere in the text, so windows may overlap (GPTQ's convention);
             `disjoint` windows never share a token (`calibration.data.draw_windows`).
    bos:     where the tokenizer adds BOS to the text it encodes (Llama 3 and 4; `adds_bos`),
             every window's first token is BOS, as in use, where position 0 always holds it
             (the attention sink). Windows otherwise start mid-text; tokenizers that add no BOS
             (SmolLM2) are unaffected.
    """

    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    chat_template: bool = False
    windows: str = "random"
    bos: bool = True

    def __post_init__(self) -> None:
        if self.windows not in WINDOW_DRAWS:
            raise InputError(f"windows={self.windows!r}: expected one of {', '.join(WINDOW_DRAWS)}")
        if not 1 <= self.samples <= MAX_COUNT:
            raise InputError(f"samples={self.samples}: expected from 1 to {MAX_COUNT:,} calibration windows")
        if not 2 <= self.seq_len <= MAX_COUNT:
            raise InputError(f"seq_len={self.seq_len}: expected from 2 to {MAX_COUNT:,} tokens per window")
        if not 0 <= self.seed < 2**63:
            raise InputError(f"seed={self.seed}: expected an integer in [0, 2^63)")


class ExpertPolicy(str, enum.Enum):
    """Which Hessian a routed expert is solved against (see MoESpec)."""

    ROUTED = "routed"
    MIXED = "mixed"
    RTN = "rtn"


@dataclass(frozen=True)
class MoESpec:
    """How routed experts are calibrated; every decision is recorded in the bundle's audit.

    policy:     `rtn`: every expert rounded to nearest (the floor). `routed`: H_e = H_routed,e, the mean of (s x)(s x)^T over the tokens routed to
                expert e (s = its sigmoid router score, applied to the input as Llama 4 does).
                `mixed`: H_e = H_routed,e + mix * H_all,e, where H_all,e is the same mean over
                all tokens (a deterministic, evenly spaced sample of at most `all_tokens`),
                each scaled by the score e would have given it, sigmoid(logit_e).
    mix:        the weight of H_all,e in `mixed` (lambda).
    min_tokens: an expert with fewer routed tokens falls back to `fallback`.
    require_full_rank: an expert with fewer routed tokens than the widest input K of its
                projections (Maverick: K = 8192 for down) falls back too: its routed Hessian,
                a mean of n < K outer products, has rank < K, and GPTQ would fix the weights'
                action on the other directions by damping alone (docs/moe.md).
    fallback:   `mixed` (its H_routed part is kept) or `rtn` (round to nearest, H = I) as last resort.
    all_tokens: the most rows in H_all,e's sample; None: max(4096, 2 K) for the widest input K
                of the expert's projections, so that H_all,e has full rank (Maverick: 16,384;
                `calibration.moe.all_token_sample_size`).
    chunk_mib:  memory budget of one chunk of experts (fp32 weights, Hessians, workspace).
    quantize_router: quantize the router linear too (default: kept in float).
    """

    policy: ExpertPolicy = ExpertPolicy.ROUTED
    mix: float = 0.1
    min_tokens: int = 128
    require_full_rank: bool = False
    fallback: ExpertPolicy = ExpertPolicy.MIXED
    all_tokens: int | None = None
    chunk_mib: int = 8192
    quantize_router: bool = False

    def __post_init__(self) -> None:
        for name in ("policy", "fallback"):
            if not isinstance(getattr(self, name), ExpertPolicy):
                raise InputError(f"moe.{name}={getattr(self, name)!r}: expected one of {[p.value for p in ExpertPolicy]}")
        if self.fallback is ExpertPolicy.ROUTED:
            raise InputError("moe.fallback=routed: expected mixed or rtn (routed is what starved experts fall back from)")
        if not 0.0 < self.mix < math.inf:
            raise InputError(f"moe.mix={self.mix}: expected a positive, finite weight for H_all, e.g. 0.1")
        if self.min_tokens < 1:
            raise InputError(f"moe.min_tokens={self.min_tokens}: expected at least 1 (an expert with no tokens has no routed Hessian)")
        if (self.all_tokens is not None and self.all_tokens < 1) or self.chunk_mib < 1:
            raise InputError("moe.all_tokens and moe.chunk_mib: expected positive integers (all_tokens: or null, "
                             "for max(4096, 2 K))")


GPTQ_SOLVE_KEYS = ("act_order", "damp", "block_size", "true_sequential")
EXPERT_POLICY_KEYS = tuple(f"moe.{key}" for key in ("policy", "mix", "min_tokens", "require_full_rank", "fallback", "all_tokens"))


def settings_unread_by(method: Method) -> tuple[str, ...]:
    """The settings `method` never reads, as recipe keys under `quantize:` (`moe.`/`awq.` ones
    dotted), and "calibration" for the whole calibration section: given with this method they
    would be ignored without a word, so recipes and the CLI refuse them and lock files leave
    them out. rtn reads no data; awq rounds after its search (no GPTQ solve; its expert
    fallback samples awq.sample_tokens, not moe.all_tokens); gptq searches no AWQ scales."""
    awq = tuple(f"awq.{field.name}" for field in dataclasses.fields(AWQSpec))
    if method is Method.RTN:
        return ("calibration", "batch_windows", *GPTQ_SOLVE_KEYS, *EXPERT_POLICY_KEYS, *awq)
    if method is Method.AWQ:
        return (*GPTQ_SOLVE_KEYS, "moe.all_tokens")
    return awq if method is Method.GPTQ else ()


@dataclass(frozen=True)
class QuantizeSpec:
    """Everything a quantize run needs besides the model and the calibration tokens.

    keep_float: per-module overrides: regular expressions (`re.search` on the full module name,
                e.g. "model.layers.3.self_attn.q_proj") of linears left unquantized, in the
                model's own float dtype. Routed experts are stored stacked on one grid and
                cannot be kept (refused when a pattern matches them).
    bits_overrides: per-module bit widths, "REGEX=BITS" (e.g. "self_attn=8"): a linear whose full
                name matches REGEX (re.search; the first matching entry wins) is quantized on
                `weights.with_bits(BITS)`. keep_float wins over a bits override; routed experts
                share one grid per layer (refused when a pattern matches them).
    """

    method: Method = Method.GPTQ
    weights: QuantSpec = QuantSpec()
    true_sequential: bool = True
    batch_windows: int = 8
    moe: MoESpec = MoESpec()
    awq: AWQSpec = AWQSpec()
    keep_float: tuple[str, ...] = ()
    bits_overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.method, Method):
            raise InputError(f"method={self.method!r}: expected one of {[m.value for m in Method]}")
        if self.batch_windows < 1:
            raise InputError(f"batch_windows={self.batch_windows}: expected a positive integer")
        if self.awq.clip is None:  # frozen: the resolved default is set once, here (True where unused, as before)
            object.__setattr__(self, "awq", dataclasses.replace(self.awq, clip=self.method is not Method.AWQ_GPTQ))
        if self.weights.clip_search and self.method.searches_scales:
            raise InputError(f"clip_search with method {self.method.value}: AWQ searches its clipping range against "
                             "the layer's outputs itself (awq.clip: on for awq, off by default for awq+gptq); use "
                             "clip_search with gptq or rtn")
        for pattern in self.keep_float:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"keep_float pattern {pattern!r}: not a regular expression ({exc})") from None
        for entry in self.bits_overrides:
            parse_bits_override(entry)

    @property
    def rounding_moe(self) -> "MoESpec":
        """The MoE spec the experts are quantized under: `awq` alone rounds every expert to nearest
        after its scale search (policy rtn; the search itself follows `moe`), other methods `moe`."""
        if self.method is Method.AWQ:
            return dataclasses.replace(self.moe, policy=ExpertPolicy.RTN)
        return self.moe

    def keeps_float(self, module: str) -> bool:
        """Whether the linear `module` (full name, no `.weight`) stays in float (see keep_float)."""
        return any(re.search(pattern, module) for pattern in self.keep_float)

    def weights_for(self, module: str) -> QuantSpec:
        """The grid of the linear `module` (full name, no `.weight`): that of the first bits
        override whose pattern matches it, else `weights`."""
        for entry in self.bits_overrides:
            pattern, bits = parse_bits_override(entry)
            if re.search(pattern, module):
                return self.weights.with_bits(bits)
        return self.weights

    def to_dict(self) -> dict:
        """JSON-friendly form, for manifests."""
        out = dataclasses.asdict(self)
        out["method"] = self.method.value
        out["moe"].update(policy=self.moe.policy.value, fallback=self.moe.fallback.value)
        if not self.bits_overrides:  # absent when unused: runs recorded before the key existed keep their identity
            del out["bits_overrides"]
        for section, key in (("moe", "require_full_rank"), ("weights", "signed_scale"), ("weights", "clip_search")):
            if not out[section][key]:
                del out[section][key]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizeSpec":
        """Inverse of `to_dict`."""
        data = dict(data)
        data["method"] = Method(data["method"])
        data["weights"] = QuantSpec(**data["weights"])
        if "awq" in data:
            data["awq"] = AWQSpec(**data["awq"])
        data["keep_float"] = tuple(data.get("keep_float", ()))
        data["bits_overrides"] = tuple(data.get("bits_overrides", ()))
        if "moe" in data:
            moe = dict(data["moe"])
            moe.update(policy=ExpertPolicy(moe["policy"]), fallback=ExpertPolicy(moe["fallback"]))
            data["moe"] = MoESpec(**moe)
        return cls(**data)
