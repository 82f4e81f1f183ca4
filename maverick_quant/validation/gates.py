"""CI gates: pass/fail conditions on the numbers of a validation report.

A gate is `KEY OP THRESHOLD` (spaces allowed around the parts):

    KEY        a dotted path to a number in the nested report: ppl_ratio, kl.mean, candidate.ppl
    OP         <=, >=, <, >, ==   (== is exact float equality)
    THRESHOLD  a number (1.05, -1.0, 5e-2), or the same KEY's value b in a baseline report:
               baseline -> b,  baseline*N -> b*N,  baseline+N -> b+N,  baseline-N -> b-N  (N >= 0)

The gate passes when `actual OP threshold` holds; a NaN actual fails every gate.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from types import MappingProxyType

from maverick_quant.errors import InputError

OPERATORS = MappingProxyType({"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
                              "==": operator.eq})
BASELINE_OPERATORS = MappingProxyType({"*": operator.mul, "+": operator.add, "-": operator.sub})

_UNSIGNED = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_GATE_RE = re.compile(r"\s*(?P<key>[A-Za-z_][\w-]*(?:\.[\w-]+)*)\s*(?P<op><=|>=|==|<|>)\s*(?P<rhs>.*?)\s*")
_NUMBER_RE = re.compile(rf"[+-]?{_UNSIGNED}")
_BASELINE_RE = re.compile(rf"baseline(?:\s*(?P<op>[*+-])\s*(?P<operand>{_UNSIGNED}))?")
EXPECTED_FORM = ("expected KEY OP THRESHOLD with OP one of <=, >=, <, >, == and THRESHOLD a number, "
                 "baseline, baseline*N, baseline+N or baseline-N (e.g. ppl_ratio<=1.05, kl.mean<=baseline*1.1)")


@dataclass(frozen=True)
class Gate:
    """One parsed gate.

    value:        the threshold when `baseline_op` is None, else the operand N of `baseline OP N`.
    baseline_op:  None, or "*", "+", "-" (a bare `baseline` is stored as baseline*1).
    """

    text: str
    key: str
    op: str
    value: float
    baseline_op: str | None = None

    @property
    def uses_baseline(self) -> bool:
        return self.baseline_op is not None

    def threshold(self, baseline_value: float | None = None) -> float:
        """The number compared against: `value`, or BASELINE_OPERATORS[baseline_op](b, value)."""
        if self.baseline_op is None:
            return self.value
        if baseline_value is None:
            raise ValueError(f"gate {self.text!r} needs a baseline value")
        return float(BASELINE_OPERATORS[self.baseline_op](baseline_value, self.value))

    def passes(self, actual: float, threshold: float) -> bool:
        """actual OP threshold."""
        return bool(OPERATORS[self.op](actual, threshold))


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate on one report."""

    gate: str
    key: str
    actual: float
    threshold: float
    passed: bool


def _bad_gate(text: str, reason: str) -> InputError:
    return InputError(f"gate {text!r}: {reason}; {EXPECTED_FORM}")


def _parse_threshold(text: str, rhs: str) -> tuple[float, str | None]:
    """THRESHOLD text -> (value, baseline_op) as stored on `Gate`."""
    if _NUMBER_RE.fullmatch(rhs):
        value = float(rhs)
        if not math.isfinite(value):
            raise _bad_gate(text, f"threshold {rhs!r} is not a finite number")
        return value, None
    match = _BASELINE_RE.fullmatch(rhs)
    if match is None:
        raise _bad_gate(text, f"cannot read threshold {rhs!r}" if rhs else "missing threshold")
    if match["op"] is None:
        return 1.0, "*"
    operand = float(match["operand"])
    if not math.isfinite(operand):
        raise _bad_gate(text, f"baseline operand {match['operand']!r} is not a finite number")
    return operand, match["op"]


def parse_gate(text: str) -> Gate:
    """Parse `KEY OP THRESHOLD` into a Gate; InputError naming the text and the form otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise _bad_gate(str(text), "empty gate")
    match = _GATE_RE.fullmatch(text)
    if match is None:
        raise _bad_gate(text, "cannot find KEY and OP")
    value, baseline_op = _parse_threshold(text, match["rhs"])
    return Gate(text=text.strip(), key=match["key"], op=match["op"], value=value, baseline_op=baseline_op)


# How report.json writes non-finite numbers: strict JSON has no NaN or Infinity, and a string is
# what no numeric check passes by accident (jq reads a bare NaN as null, and null < 0.1 is true)
NON_FINITE = MappingProxyType({"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf})


def json_safe(value):
    """`value` (nested dicts and lists) with each non-finite float replaced by its NON_FINITE name."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def flatten(report: Mapping, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict under dotted keys: {"kl": {"mean": 0.1}} -> {"kl.mean": 0.1}.

    Only int/float leaves reachable through dicts are kept, and the NON_FINITE names a report
    writes for NaN and infinities (bools, other strings and lists are skipped).
    """
    flat: dict[str, float] = {}
    for name, value in report.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{key}."))
        elif isinstance(value, Real) and not isinstance(value, bool):
            flat[key] = float(value)
        elif isinstance(value, str) and value in NON_FINITE:
            flat[key] = NON_FINITE[value]
    return flat


def _lookup(flat: Mapping[str, float], key: str, gate: Gate, where: str) -> float:
    """flat[key], or InputError naming the gate, the key and the keys available in `where`."""
    if key not in flat:
        available = ", ".join(sorted(flat)) or "none"
        raise InputError(f"gate {gate.text!r}: no number {key!r} in the {where}; available keys: {available}")
    return flat[key]


def _baseline_value(gate: Gate, flat_baseline: Mapping[str, float] | None) -> float | None:
    """The baseline number a gate compares with (None for a gate with a fixed threshold), or
    InputError when it needs a baseline that was not given or that lacks its key."""
    if not gate.uses_baseline:
        return None
    if flat_baseline is None:
        raise InputError(f"gate {gate.text!r} compares with `baseline` but no baseline report was given "
                         "(pass --baseline PREVIOUS/report.json)")
    value = _lookup(flat_baseline, gate.key, gate, "baseline report")
    if not math.isfinite(value):  # inf*1.1 would pass any candidate; NaN would fail every one
        raise InputError(f"gate {gate.text!r}: the baseline report's {gate.key} is {value}, not a number to compare "
                         "with (pass a baseline whose candidate was sound, or a fixed threshold)")
    return value


# Numbers every report holds (RUN_KEYS), and those of a validation on evaluation text (TEXT_KEYS);
# tests/test_cli_e2e.py checks that a real report's numbers are these.
RUN_KEYS = frozenset({"seconds", "resources.peak_rss_mib"})
GPU_KEYS = frozenset({"resources.peak_gpu_mib"})  # on a CUDA device only
TEXT_KEYS = frozenset({"ppl_ratio", "top1_agreement", "tokens", "nonfinite_tokens", "candidate.nll", "candidate.ppl", "reference.nll",
                       "reference.ppl", "kl.mean", "kl.median", "kl.p90", "kl.p99", "kl.max", "protocol.ctx",
                       "protocol.windows", "protocol.first_scored_position"})
# Sections whose keys depend on the run (tasks, experts, images); ReportShape says which a run's report holds.
SECTIONS = ("hellaswag", "multiple_choice", "experts", "routing", "vision")
VISION_KEYS = frozenset({"vision.images", "vision.tokens_per_image", "vision.rel_error.mean", "vision.rel_error.max"})


@dataclass(frozen=True)
class ReportShape:
    """What a validation's report will hold, known before any work.

    text: it evaluates text (--data); gpu: it runs on a CUDA device; hellaswag / choices: those
    benchmarks run; moe: the model has MoE layers; gguf: the candidate is a GGUF, which
    llama.cpp runs whole (no per-layer, per-expert or routing numbers); kernels: a bundle runs
    on the 4-bit kernels, whose MoE layers run whole (no routing; its experts are still
    measured, on the reference's side); vision: a GGUF's projector is compared too (--mmproj).
    Per-expert errors and routing are measured by the layer-by-layer evaluation of text."""

    text: bool
    gpu: bool = False
    hellaswag: bool = False
    choices: bool = False
    moe: bool = False
    gguf: bool = False
    kernels: bool = False
    vision: bool = False

    def absent_because(self, key: str) -> str | None:
        """Why the report will hold no section for gate key `key` (None: it will, or `key` is
        not in a section). Keys inside a section the report holds are taken as given."""
        section = key.split(".", 1)[0]
        reasons = {
            "hellaswag": None if self.hellaswag else "only with --hellaswag",
            "multiple_choice": None if self.choices else "only with --choices",
            "vision": None if self.vision else "only with --mmproj (a GGUF candidate's projector)",
            "experts": self._expert_reason(measured=key.startswith("experts.rel_error"), routing=False),
            "routing": self._expert_reason(measured=True, routing=True),
        }
        return reasons.get(section)

    def _expert_reason(self, measured: bool, routing: bool) -> str | None:
        """Why experts.* / routing.* numbers will be absent (`measured`: numbers the layer-by-layer
        evaluation measures, not the bundle's quantize audit; `routing`: the candidate's routing)."""
        if not self.moe:
            return "only for a mixture-of-experts model"
        if self.gguf:
            return "not for a GGUF candidate (llama.cpp runs it whole)"
        if measured and not self.text:
            return "only with --data (the layer-by-layer evaluation of text measures them)"
        if routing and self.kernels:
            return "not with kernels (the 4-bit kernels run MoE layers whole)"
        return None


def check_gate_keys(gates: Sequence[Gate], shape: ReportShape) -> None:
    """Before any work: InputError for a gate whose key the report will not hold (a misspelt
    metric, or a section this run will not make, used to be found after the whole evaluation)."""
    known = RUN_KEYS | (TEXT_KEYS if shape.text else frozenset()) | (GPU_KEYS if shape.gpu else frozenset())
    for gate in gates:
        section = gate.key.split(".", 1)[0]
        if section in SECTIONS:
            if reason := shape.absent_because(gate.key):
                raise InputError(f"gate {gate.text!r}: the report has {section} numbers {reason}")
            if section == "vision" and gate.key not in VISION_KEYS:  # a fixed set, unlike the benchmarks' sections
                raise InputError(f"gate {gate.text!r}: the report will hold no number {gate.key!r}; expected one of "
                                 f"{', '.join(sorted(VISION_KEYS))}")
        elif gate.key not in known:
            sections_text = ", ".join(f"{name}.*" for name in SECTIONS)
            raise InputError(f"gate {gate.text!r}: the report will hold no number {gate.key!r}; expected one of "
                             f"{', '.join(sorted(known))} (or {sections_text})")


# What a baseline report must share with this run for a gate to compare their numbers: every
# number is measured against the same reference model; text numbers (and the per-expert and
# routing ones, measured on that text) on the same token windows scored from the same position;
# a benchmark's accuracy on the same tasks of the same file. Reports written before a fact was
# recorded lack it: those facts are left unchecked (and named in a note).
REFERENCE_FACTS = ("reference_fingerprint",)
TEXT_FACTS = ("protocol.name", "protocol.ctx", "protocol.windows", "protocol.first_scored_position",
              "protocol.windows_sha256")
BENCHMARK_SECTIONS = ("hellaswag", "multiple_choice")


def comparable_facts(key: str) -> tuple[str, ...]:
    """The dotted report facts a baseline must share with this run for gate key `key`."""
    section = key.split(".", 1)[0]
    if section in BENCHMARK_SECTIONS:
        return REFERENCE_FACTS + (f"{section}.tasks", f"{section}.sha256")
    if key in TEXT_KEYS or section in ("experts", "routing"):
        return REFERENCE_FACTS + TEXT_FACTS
    return REFERENCE_FACTS


def dotted_value(report: Mapping, dotted: str):
    """report's value at dotted path `dotted` ("protocol.ctx" -> report["protocol"]["ctx"]), or
    None when any part is missing."""
    value = report
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def check_comparable(gates: Sequence[Gate], run_facts: Mapping, baseline: Mapping | None) -> list[str]:
    """InputError for a gate comparing with a baseline measured on something else than this run
    (another reference model, other windows, other tasks): its threshold would be a number of
    another measurement, and a gate on it would pass or fail for that reason alone. Facts are
    compared where both `run_facts` (report-shaped: this run's report, or what is known of it
    before any work) and `baseline` hold them; returns the facts this run holds that the
    baseline does not record (an older report), which could not be checked."""
    unchecked: list[str] = []
    if baseline is None:
        return unchecked
    for gate in (gate for gate in gates if gate.uses_baseline):
        for name in comparable_facts(gate.key):
            ours, theirs = dotted_value(run_facts, name), dotted_value(baseline, name)
            if ours is None:
                continue
            if theirs is None:
                unchecked += [name] if name not in unchecked else []
            elif ours != theirs:
                raise InputError(f"gate {gate.text!r}: the baseline report was measured with {name} = {theirs!r}, "
                                 f"this run with {ours!r}: its {gate.key} is not comparable (pass a baseline "
                                 "report of the same reference, text and tasks, or a fixed threshold)")
    return unchecked


def check_baseline(gates: Sequence[Gate], baseline: Mapping | None, run_facts: Mapping | None = None) -> list[str]:
    """Before any work: InputError for a gate that needs a baseline report that was not given,
    a key that report lacks, or a baseline measured on something else than `run_facts`, what
    is known of this run's report before any work (check_comparable; found at the start, not
    after hours of evaluation). Returns the facts the baseline could not be checked on."""
    flat_baseline = flatten(baseline) if baseline is not None else None
    for gate in gates:
        _baseline_value(gate, flat_baseline)
    return check_comparable(gates, run_facts or {}, baseline)


def evaluate_gates(gates: Sequence[Gate], report: Mapping, baseline: Mapping | None = None) -> list[GateResult]:
    """Evaluate every gate on `report`, reading `baseline` for gates that use it.

    InputError when a key is absent from the report or baseline, a gate needs a baseline that
    was not given, or the baseline was measured on something else than `report` (check_comparable).
    """
    check_comparable(gates, report, baseline)
    flat = flatten(report)
    flat_baseline = flatten(baseline) if baseline is not None else None
    results = []
    for gate in gates:
        actual = _lookup(flat, gate.key, gate, "report")
        threshold = gate.threshold(_baseline_value(gate, flat_baseline))
        results.append(GateResult(gate.text, gate.key, actual, threshold, gate.passes(actual, threshold)))
    return results
