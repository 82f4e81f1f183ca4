"""Frozen, validated configuration objects shared by every stage.

Each dataclass validates itself in `__post_init__` and raises `InputError` naming the
option and the allowed values, so a bad CLI flag or recipe key fails before any work.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from maverick_quant.errors import InputError


class Method(str, enum.Enum):
    """Weight quantization algorithm."""

    RTN = "rtn"
    GPTQ = "gptq"


ALLOWED_GROUP_SIZES = (-1, 32, 64, 128, 256)


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
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128

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


@dataclass(frozen=True)
class CalibSpec:
    """How calibration windows are drawn from a text source."""

    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise InputError(f"samples={self.samples}: expected at least 1 calibration window")
        if self.seq_len < 2:
            raise InputError(f"seq_len={self.seq_len}: expected at least 2 tokens per window")


@dataclass(frozen=True)
class QuantizeSpec:
    """Everything a quantize run needs besides the model and the calibration tokens."""

    method: Method = Method.GPTQ
    weights: QuantSpec = QuantSpec()
    true_sequential: bool = True
    batch_windows: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.method, Method):
            raise InputError(f"method={self.method!r}: expected one of {[m.value for m in Method]}")
        if self.batch_windows < 1:
            raise InputError(f"batch_windows={self.batch_windows}: expected a positive integer")

    def to_dict(self) -> dict:
        """JSON-friendly form, for manifests."""
        out = dataclasses.asdict(self)
        out["method"] = self.method.value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizeSpec":
        """Inverse of `to_dict`."""
        data = dict(data)
        data["method"] = Method(data["method"])
        data["weights"] = QuantSpec(**data["weights"])
        return cls(**data)
