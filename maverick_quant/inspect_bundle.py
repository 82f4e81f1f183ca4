"""`maverick-quant inspect`: what a bundle holds and what was decided for each expert; what an
export (directory or GGUF file) holds, with its files checked against its manifest."""

from __future__ import annotations

import json
from pathlib import Path

from maverick_quant.bundle import Bundle
from maverick_quant.calibration.moe import RANK_DEFICIENT_ADVICE
from maverick_quant.errors import InputError


def bundle_summary(bundle: Bundle, top: int = 5) -> str:
    """Recipe, size and GPTQ loss of a bundle; for MoE bundles the most and least used
    experts, every fallback, and the experts with the largest relative loss."""
    manifest = bundle.manifest
    quant = manifest["recipe"]["weights"]
    size = sum(f["bytes"] for f in manifest["files"].values())
    lines = [f"{bundle.root}: {manifest['source']['architecture'][0]}, {bundle.num_layers} layers, "
             f"{manifest['recipe']['method']} {quant['bits']}-bit group {quant['group_size']} "
             f"{'sym' if quant['sym'] else 'asym'}{' signed-scale' if quant.get('signed_scale') else ''}{' clip-search' if quant.get('clip_search') else ''}, "
             f"{size / 2**20:.1f} MiB"]
    lines += _override_lines(bundle)
    loss = manifest["summary"].get("mean_rel_loss")
    if loss is not None:
        lines.append(f"mean relative GPTQ loss of the dense linears: {loss:.5f}")
    audit = expert_audit(bundle)
    if not audit:
        return "\n".join(lines)
    calibrated = [r for r in audit if r["tokens"] is not None]
    by_tokens = sorted(calibrated, key=lambda r: r["tokens"])
    describe = lambda r: f"L{r['layer']}/E{r['expert']} {r['tokens']} tok ({100 * r['share']:.1f}%)"  # noqa: E731
    lines.append(f"experts: {len(audit)} in {len({r['layer'] for r in audit})} MoE layers")
    if by_tokens:
        lines.append("most used:  " + ", ".join(describe(r) for r in by_tokens[::-1][:top]))
        lines.append("least used: " + ", ".join(describe(r) for r in by_tokens[:top]))
    fallbacks = [r for r in audit if _fallback_stages(r)]
    lines.append(f"fallbacks: {len(fallbacks)}" + "".join(f"\n  L{r['layer']}/E{r['expert']}: {'; '.join(_fallback_stages(r))}"
                                                         for r in fallbacks))
    deficient = [r for r in audit if r.get("rank_deficient")]
    if deficient:
        lines.append(f"rank-deficient Hessians: {len(deficient)} experts were solved on fewer rows than a projection's "
                     f"input width K ({RANK_DEFICIENT_ADVICE})")
    worst = sorted(calibrated, key=lambda r: -max(l["rel_loss"] for l in r["linears"].values()))[:top]
    lines.append("largest relative loss: " + ", ".join(
        f"L{r['layer']}/E{r['expert']} {max(l['rel_loss'] for l in r['linears'].values()):.4f}" for r in worst))
    return "\n".join(lines)


def _fallback_stages(record: dict) -> list[str]:
    """What fell back for one expert: GPTQ's rounding policy (`reason`), AWQ's scale search
    (`awq_reason`: under AWQ every expert then rounds, so `reason` says no fallback), or both."""
    stages = [f"{record['policy']} ({record['reason']})"] if "fallback" in record["reason"] else []
    if "fallback" in (record.get("awq_reason") or ""):
        stages.append(f"AWQ scales: {record.get('awq_policy')} ({record['awq_reason']})")
    return stages


def _override_lines(bundle: Bundle) -> list[str]:
    """One line per kind of per-module override: linears kept in float, linears on another grid."""
    kept = sum(len(bundle.kept_float(index)) for index in range(bundle.num_layers))
    widths: dict[int, int] = {}
    for grid in bundle.overridden_grids().values():
        widths[grid["bits"]] = widths.get(grid["bits"], 0) + 1
    lines = [f"kept in float: {kept} linears"] if kept else []
    return lines + [f"bits overrides: {count} linears at {bits} bits" for bits, count in sorted(widths.items())]


def expert_audit(bundle: Bundle) -> list[dict]:
    """Every (layer, expert) record of the bundle, from the layer stats in its manifest."""
    return [{"layer": index, **record} for index, layer in enumerate(bundle.manifest["layers"])
            for record in layer.get("experts", {}).get("audit", [])]


def expert_token_counts(records: list[dict]) -> dict[int, list[int]]:
    """{MoE layer: routed calibration tokens per expert} from audit records (layer, tokens);
    empty when no record counted tokens (an RTN run routes nothing; an export has no audit)."""
    if not any(record.get("tokens") is not None for record in records):
        return {}
    counts: dict[int, list[int]] = {}
    for record in records:
        counts.setdefault(record["layer"], []).append(record.get("tokens") or 0)
    return counts


def plot_bundle_experts(bundle: Bundle, path: Path) -> Path:
    """Heat map of routed calibration tokens per expert per MoE layer."""
    from maverick_quant.validation.report import plot_expert_tokens

    return plot_expert_tokens(expert_token_counts(expert_audit(bundle)), Path(path),
                              f"Calibration tokens per expert: {bundle.root.name}")


def artifact_summary(path: Path, verify: bool = True) -> tuple[str, list[str] | None]:
    """What an export holds (a directory with manifest.json, or a .gguf file) and the files whose
    hashes no longer match its manifest (empty when all verify; None when there is no manifest
    or `verify` is off)."""
    from maverick_quant.exporters.artifact import verify_manifest

    path, bad = Path(path), None
    if path.is_file():
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise InputError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF with b'GGUF'); inspect reads "
                             "bundles, export directories and GGUF files")
    try:  # verified first: a damaged file is reported as such, not as a parser's traceback
        if path.is_file():
            manifest = gguf_manifest(path)
            bad = verify_manifest(manifest, complete=False) if manifest is not None and verify else None
        elif verify:
            bad = verify_manifest(path / "manifest.json")
        return (gguf_summary(path) if path.is_file() else _directory_summary(path)), bad
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"{path}: cannot be read ({type(exc).__name__}: {exc})", [*(bad or []), f"{path.name} (unreadable)"]


def _directory_summary(path: Path) -> str:
    """An export directory's format, source, files and quantization_config, in two lines."""
    manifest = json.loads((path / "manifest.json").read_text())
    config = json.loads((path / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    size = sum(record["bytes"] for record in manifest["files"].values())
    lines = [f"{path}: {manifest['format']} export of {manifest['source']['model_dir']} "
             f"({', '.join(config.get('architectures', []))}), {len(manifest['files'])} files, {size / 2**20:.1f} MiB",
             "quantization_config: " + json.dumps({k: v for k, v in quant.items() if k not in ("ignore", "dynamic",
                                                                                               "modules_to_not_convert")})]
    return "\n".join(lines)


def gguf_manifest(path: Path) -> Path | None:
    """The manifest that lists a GGUF file: its own `<name>.manifest.json`, or (an mmproj) the
    manifest of the GGUF it was exported with, beside it."""
    from maverick_quant.exporters.artifact import gguf_sidecars

    own = gguf_sidecars(path)[1]
    if own.is_file():
        return own
    for manifest in sorted(path.parent.glob("*.gguf.manifest.json")):
        try:
            if path.name in json.loads(manifest.read_text()).get("files", {}):
                return manifest
        except (OSError, ValueError):
            continue
    return None


def projector_line(fields) -> str:
    """What a llama4 mmproj holds (its `clip.*` keys): geometry and image tokens per chunk."""
    from maverick_quant.arch.llama4 import image_tokens_per_chunk

    def value(key: str):
        content = fields[key].contents() if key in fields else None
        return [round(v, 4) for v in content] if isinstance(content, list) else content

    size, patch, scale = (value(f"clip.vision.{key}") for key in ("image_size", "patch_size", "projector.scale_factor"))
    tokens = image_tokens_per_chunk(size, patch, scale) if size and patch and scale else None
    return (f"{value('clip.projector_type')} projector: {size}-pixel images, patch {patch}, {tokens} tokens per image "
            f"chunk; vision width {value('clip.vision.embedding_length')} x {value('clip.vision.block_count')} blocks "
            f"-> {value('clip.vision.projection_dim')}; image mean {value('clip.vision.image_mean')} std "
            f"{value('clip.vision.image_std')}")


def gguf_summary(path: Path) -> str:
    """Architecture, tensor count and bytes per GGML type of a GGUF file (read with gguf-py);
    for a vision projector (mmproj), its geometry too."""
    import gguf

    reader = gguf.GGUFReader(path)
    by_type: dict[str, list[int]] = {}
    for tensor in reader.tensors:
        entry = by_type.setdefault(tensor.tensor_type.name, [0, 0])
        entry[0] += 1
        entry[1] += int(tensor.n_bytes)
    arch = reader.fields["general.architecture"].contents()
    types = ", ".join(f"{name}: {count} tensors {size / 2**20:.1f} MiB" for name, (count, size) in sorted(by_type.items()))
    summary = f"{path}: GGUF {arch}, {len(reader.tensors)} tensors ({types})"
    return summary + ("\n" + projector_line(reader.fields) if "clip.projector_type" in reader.fields else "")
