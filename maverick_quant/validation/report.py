"""Write a validation report: report.json, a ten-second report.md and PNG plots.

Every file is written to a temporary name in the output directory, flushed to the disk and
renamed into place, so a reader never sees a half-written file, nor a power loss an empty one. Plots use matplotlib's Agg canvas
directly (no pyplot, no global backend change); matplotlib is imported only when plotting.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import torch

from maverick_quant.outputs import durable_replace
from maverick_quant.validation.gates import GateResult, dotted_value as _get, json_safe

METRIC_KEYS = frozenset({"reference", "candidate", "ppl_ratio", "kl", "top1_agreement", "tokens", "gates", "layers", "vision",
                         "experts", "routing"})
"""Top-level report keys shown in the metric table or plots; any other key goes to the "Run" section."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call write(file) on a temporary file next to `path`, then rename it onto `path`, durably
    (outputs.durable_replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        durable_replace(Path(tmp_name), path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _json_default(value):
    """JSON fallback: paths as strings, tensor/numpy scalars as Python numbers."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"report value of type {type(value).__name__} is not JSON serialisable")


def _fmt(value) -> str:
    """A number for people: ints with thousands separators, floats to 6 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6g}"


def _fmt_exact(value) -> str:
    """A gate's number in full (repr's shortest round-trip digits): a FAIL by 4e-7 must not read
    as two equal numbers."""
    return repr(value) if isinstance(value, float) else _fmt(value)


def _metric_table(report: Mapping) -> list[str]:
    """metric | reference | candidate | change, for perplexity, KL, top-1 agreement and tokens."""
    ratio = _get(report, "ppl_ratio")
    change = f"{(ratio - 1) * 100:+.2f}% (x{ratio:.4f})" if isinstance(ratio, (int, float)) else ""
    rows = [
        ("perplexity", _fmt(_get(report, "reference.ppl")), _fmt(_get(report, "candidate.ppl")), change),
        ("KL mean (ref ‖ cand)", "—", _fmt(_get(report, "kl.mean")), ""),
        ("KL p99", "—", _fmt(_get(report, "kl.p99")), ""),
        ("top-1 agreement", "—", _fmt(_get(report, "top1_agreement")), ""),
        ("tokens", _fmt(_get(report, "tokens")), _fmt(_get(report, "tokens")), ""),
    ]
    lines = ["| metric | reference | candidate | change |", "|---|---:|---:|---:|"]
    return lines + [f"| {' | '.join(row)} |" for row in rows]


def _gate_fields(result) -> tuple[str, object, object, bool]:
    """(gate, actual, threshold, passed) from a GateResult or its dict form in report["gates"]."""
    if isinstance(result, GateResult):
        return result.gate, result.actual, result.threshold, result.passed
    return result["gate"], result.get("actual"), result.get("threshold"), bool(result.get("passed"))


def _gate_section(results: Sequence) -> list[str]:
    """PASS/FAIL table of the gates and a one-line verdict."""
    if not results:
        return ["## Gates", "", "No gates were given."]
    fields = [_gate_fields(result) for result in results]
    failed = sum(not passed for *_, passed in fields)
    verdict = f"**All {len(fields)} gates passed.**" if not failed else f"**{failed} of {len(fields)} gates FAILED.**"
    lines = ["## Gates", "", verdict, "", "| gate | actual | threshold | result |", "|---|---:|---:|---|"]
    lines += [f"| `{gate}` | {_fmt_exact(actual)} | {_fmt_exact(threshold)} | {'PASS' if passed else 'FAIL'} |"
              for gate, actual, threshold, passed in fields]
    return lines


def _key_value_lines(value, prefix: str) -> list[str]:
    """`- key: value` lines, nested dicts under dotted keys, lists summarised by their length."""
    if isinstance(value, Mapping):
        return [line for name, item in value.items() for line in _key_value_lines(item, f"{prefix}.{name}")]
    if isinstance(value, (list, tuple)):
        return [f"- {prefix}: {len(value)} entries"]
    return [f"- {prefix}: {_fmt(value)}"]


def _run_section(report: Mapping) -> list[str]:
    """Every top-level key not in METRIC_KEYS (protocol, models, version, ...), as key: value lines."""
    lines = [line for key in sorted(report) if key not in METRIC_KEYS for line in _key_value_lines(report[key], key)]
    return ["## Run", "", *lines] if lines else []


def _worst_layer_line(layer_errors: Sequence[tuple[str, float]] | None) -> list[str]:
    if not layer_errors:
        return []
    name, error = max(layer_errors, key=lambda item: item[1] if math.isfinite(item[1]) else math.inf)
    return [f"Largest relative layer error: {name} ({_fmt(float(error))})."]


def _expert_rows(title: str, rows: list[dict]) -> list[str]:
    """A titled table of per-expert rows (quantize audit and validation fields, n/a where absent)."""
    if not rows:
        return []
    lines = [f"{title}:", "", "| layer | expert | calib. tokens | policy | quantize rel. loss | eval tokens | "
             "validation rel. error |", "|---:|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['expert']} | {_fmt(r.get('tokens'))} | {r.get('policy', 'n/a')} | "
              f"{_fmt(r.get('rel_loss'))} | {_fmt(r.get('eval_tokens'))} | {_fmt(r.get('rel_error'))} |" for r in rows]
    return lines + [""]


def _expert_section(experts: Mapping | None, routing: Mapping | None = None, shown: int = 5) -> list[str]:
    """An MoE candidate's routed experts: how many (and how many fell back, from its quantize
    audit), the pooled / median / worst validation error per expert, the routing agreement, and
    tables of the experts with the largest validation error, the largest quantize loss and the
    fewest calibration tokens."""
    if not experts:
        return []
    rows = experts.get("per_expert", [])
    lines = ["## Routed experts", ""]
    head = f"{_fmt(experts.get('count'))} experts"
    if experts.get("fallbacks") is not None:
        head += f", {_fmt(experts['fallbacks'])} quantized by their fallback policy (too few routed calibration tokens)"
    lines += [head + ".", ""]
    error = experts.get("rel_error")
    if error:
        worst = (f"; worst {_fmt(error['max'])} (layer {error['max_layer']}, expert {error['max_expert']}) over experts "
                 f"with at least {error['max_min_tokens']} tokens" if "max" in error else "")
        lines += [f"Validation error per expert (each on the tokens the reference routes to it): pooled "
                  f"{_fmt(error['pooled'])}, median {_fmt(error['median'])}{worst}; "
                  f"{_fmt(experts.get('measured'))} experts received tokens.", ""]
    for key, label in (("agreement", "each model on its own stream"),
                       ("agreement_local", "the candidate layer on the reference's input")):
        if routing and key in routing:
            lines += [f"Routing agreement, {label}: mean {_fmt(routing[key]['mean'])}, lowest "
                      f"{_fmt(routing[key]['min'])} (layer {routing[key]['min_layer']}).", ""]
    min_tokens = (error or {}).get("max_min_tokens", 0)
    largest = sorted((r for r in rows if r.get("rel_error") is not None
                      and (r.get("eval_tokens", 0) >= min_tokens or not math.isfinite(r["rel_error"]))),
                     key=lambda r: -_worst_first(r["rel_error"]))[:shown]
    lossy = sorted((r for r in rows if r.get("rel_loss") is not None), key=lambda r: -r["rel_loss"])[:shown]
    starved = sorted((r for r in rows if r.get("tokens") is not None), key=lambda r: r["tokens"])[:shown]
    lines += _expert_rows("Largest validation error", largest)
    lines += _expert_rows("Largest relative loss when quantized", lossy)
    return lines + _expert_rows("Fewest calibration tokens", starved)


def _vision_section(vision: Mapping | None) -> list[str]:
    """The image-embedding comparison of a GGUF candidate's mmproj (`validate --mmproj`)."""
    if not vision:
        return []
    error, norms = vision["rel_error"], vision.get("normalisation", {})
    lines = ["## Vision (llama.cpp's mmproj against the reference's vision tower)", "",
             f"{vision['images']} images, {vision['tokens_per_image']} image tokens each, from `{vision['mmproj']}`: "
             f"relative error of the image embeddings mean {_fmt(error['mean'])}, max {_fmt(error['max'])}.", "",
             f"{vision['token_order']}.", ""]
    reference, in_file = norms.get("reference"), norms.get("mmproj")
    if reference and in_file and not _same_normalisation(reference, in_file):
        lines += [f"**The image normalisation differs**: the reference's mean {reference['mean']} std "
                  f"{reference['std']} (from {reference['from']}), the mmproj's mean {in_file['mean']} std "
                  f"{in_file['std']}.", ""]
    return lines


def render_markdown(report: Mapping, gate_results: Sequence | None = None,
                    layer_errors: Sequence[tuple[str, float]] | None = None, plots: Sequence[Path] = ()) -> str:
    """report.md text: metric table, gates, worst layer, routed experts, extra report sections, plot links."""
    gates = gate_results if gate_results is not None else report.get("gates", [])
    lines = ["# Validation report", "", *_metric_table(report), "", *_worst_layer_line(layer_errors), ""]
    lines += [*_gate_section(gates), ""]
    lines += _expert_section(report.get("experts"), report.get("routing"))
    lines += _vision_section(report.get("vision"))
    run = _run_section(report)
    lines += [*run, ""] if run else []
    lines += [f"![{plot.stem}]({plot.name})" for plot in plots]
    return "\n".join(lines).rstrip("\n") + "\n"


def _new_figure(title: str):
    """A matplotlib Figure on its own Agg canvas (no pyplot state, no backend switch) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    return figure, axes


def _save_png(figure, path: Path) -> Path:
    return _atomic_write(path, lambda handle: figure.savefig(handle, format="png"))


def plot_kl_histogram(kl_values: torch.Tensor, path: Path) -> Path:
    """Histogram of per-token KL [N] with a log-scale count axis and the mean marked."""
    values = kl_values.detach().reshape(-1).double().cpu()
    finite = values[torch.isfinite(values)]
    dropped = values.numel() - finite.numel()
    title = "Per-token KL(P_ref ‖ P_cand)" + (f" ({dropped} non-finite omitted)" if dropped else "")
    figure, axes = _new_figure(title)
    if finite.numel():
        axes.hist(finite.numpy(), bins=100, log=True)
        axes.axvline(finite.mean().item(), color="black", linestyle="--", label=f"mean {finite.mean().item():.4g}")
        axes.legend()
    axes.set_xlabel("KL (nats)")
    axes.set_ylabel("tokens")
    return _save_png(figure, path)


def plot_layer_errors(layer_errors: Sequence[tuple[str, float]], path: Path) -> Path:
    """Bar chart of relative output error per layer; log scale when the errors span > 100x."""
    errors = [float(error) for _, error in layer_errors]
    figure, axes = _new_figure("Relative output error per layer")
    axes.bar(range(len(errors)), errors)
    positive = [error for error in errors if error > 0 and math.isfinite(error)]
    if positive and max(positive) > 100 * min(positive) and len(positive) == len(errors):
        axes.set_yscale("log")
    axes.set_xlabel("layer")
    axes.set_ylabel("||f_c(h) - f_r(h)||² / ||f_r(h) - h||²")
    if len(errors) <= 16:
        axes.set_xticks(range(len(errors)), [name for name, _ in layer_errors], rotation=45, ha="right")
    return _save_png(figure, path)


def _same_normalisation(reference: Mapping, in_file: Mapping) -> bool:
    """Whether two image normalisations agree up to float32 (the GGUF stores them as float32:
    0.48 reads back as 0.4799999892...)."""
    pairs = [(a, b) for key in ("mean", "std") for a, b in zip(reference[key], in_file[key], strict=True)]
    return all(math.isclose(a, b, rel_tol=1e-6) for a, b in pairs)


def _worst_first(value: float) -> float:
    """A sort key that puts NaN above every number (NaN compares false, so it used to land anywhere)."""
    return math.inf if math.isnan(value) else value


def _expert_heat_map(grid: Mapping[int, Sequence[float | None]], path: Path, title: str, label: str,
                     missing_label: str, log: bool = False) -> Path:
    """Heat map of one value per expert (x) per MoE layer (y), {layer: [value or None per
    expert]}; missing values (None) are marked with a red dot labelled `missing_label`, and
    non-finite ones (a broken expert) with a black cross."""
    layers = sorted(grid)
    missing = torch.tensor([[v is None for v in grid[layer]] for layer in layers])
    values = torch.tensor([[math.nan if v is None else float(v) for v in grid[layer]] for layer in layers],
                          dtype=torch.float64)
    broken = ~values.isfinite() & ~missing
    values[broken] = math.nan  # left blank by imshow, marked below
    shown = values.clamp_min(1e-12).log10() if log else values
    figure, axes = _new_figure(title)
    image = axes.imshow(shown.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label=f"log10 {label}" if log else label)
    if missing.any():
        starved = missing.nonzero().tolist()
        axes.scatter([e for _, e in starved], [l for l, _ in starved], marker=".", color="red", label=missing_label)
    if broken.any():
        cells = broken.nonzero().tolist()
        axes.scatter([e for _, e in cells], [l for l, _ in cells], marker="x", color="black", label="non-finite")
    if missing.any() or broken.any():
        axes.legend(loc="upper right")
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    return _save_png(figure, path)


def plot_expert_tokens(counts: Mapping[int, Sequence[int]], path: Path, title: str = "Tokens per expert") -> Path:
    """Heat map of routed tokens per expert (x) per MoE layer (y), as shares of the layer's
    tokens; experts that received none are marked with a dot."""
    shares = {layer: [c / max(sum(row), 1) if c else None for c in row] for layer, row in counts.items()}
    return _expert_heat_map(shares, path, title, "share of the layer's tokens", "no tokens")


def plot_expert_errors(rows: Sequence[Mapping], path: Path) -> Path:
    """Heat map (log scale) of each routed expert's validation error, from the report's
    per-expert rows (layer, expert, rel_error); experts given no token are marked."""
    grid: dict[int, dict[int, float | None]] = {}
    for row in rows:
        grid.setdefault(row["layer"], {})[row["expert"]] = row.get("rel_error")
    dense = {layer: [experts.get(e) for e in range(max(experts) + 1)] for layer, experts in grid.items()}
    return _expert_heat_map(dense, path, "Validation error per routed expert",
                            "||E_c(x) - E_r(x)||² / ||E_r(x)||²", "no tokens", log=True)


def write_report(report: dict, out_dir: Path, *, kl_values: torch.Tensor | None = None,
                 layer_errors: list[tuple[str, float]] | None = None,
                 gate_results: list | None = None, expert_tokens: Mapping[int, Sequence[int]] | None = None) -> list[Path]:
    """Write report.json, kl_histogram.png / layer_error.png / expert_tokens.png (when their data
    is given: `expert_tokens` is {MoE layer: calibration tokens per expert}), expert_error.png
    (when report["experts"] has per-expert validation errors) and report.md, which links every plot.

    Returns the paths written, report.json first and report.md last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(report, default=_json_default))  # tensors, numpy and paths as JSON values
    text = json.dumps(json_safe(plain), indent=2, sort_keys=True, allow_nan=False) + "\n"
    written = [_atomic_write(out_dir / "report.json", lambda handle: handle.write(text.encode()))]
    plots = []
    if kl_values is not None and kl_values.numel():
        plots.append(plot_kl_histogram(kl_values, out_dir / "kl_histogram.png"))
    if layer_errors:
        plots.append(plot_layer_errors(layer_errors, out_dir / "layer_error.png"))
    if expert_tokens:
        plots.append(plot_expert_tokens(expert_tokens, out_dir / "expert_tokens.png", "Calibration tokens per expert"))
    measured = [row for row in report.get("experts", {}).get("per_expert", []) if "rel_error" in row]
    if measured:
        plots.append(plot_expert_errors(measured, out_dir / "expert_error.png"))
    markdown = render_markdown(report, gate_results, layer_errors, plots)
    written += plots
    # a path that is not UTF-8 (a byte the file system kept) is shown escaped, not a crash at the very end
    written.append(_atomic_write(out_dir / "report.md", lambda handle: handle.write(markdown.encode("utf-8", "backslashreplace"))))
    return written
