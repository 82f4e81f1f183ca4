"""What every exported artifact carries: a model card and a manifest of its files.

    README.md      model card: source model and fingerprint, recipe, calibration data
                   fingerprint, tool version, how to load the format, and the validation
                   summary of a `validate` report when one is given (`export --report DIR`).
    manifest.json  {"format", "tool_version", "source", "bundle_manifest_sha256" (the sha256 of
                   the bundle's manifest.json, which hashes its every file; absent for a float
                   model's GGUF), "files": {name: {"sha256", "bytes"}}}

A GGUF export is one file (two with a Llama 4's `--mmproj` projector file, hashed into the
same manifest); its card and manifest sit beside it as `<name>.gguf.README.md` and
`<name>.gguf.manifest.json`. `verify_manifest` re-hashes the files (used by `inspect`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from maverick_quant import __version__
from maverick_quant.bundle import BUNDLE_FORMAT, MANIFEST, Bundle
from maverick_quant.checkpoint import load_json_object, manifest_format, read_json_object, sha256_file
from maverick_quant.outputs import write_json_atomic, write_text_atomic
from maverick_quant.errors import InputError

LOADING = {
    "gptq": "transformers + GPTQModel (`AutoModelForCausalLM.from_pretrained(DIR)`), vLLM (`vllm serve DIR`)",
    "awq": "transformers + GPTQModel (`AutoModelForCausalLM.from_pretrained(DIR)`), vLLM (`vllm serve DIR`)",
    "compressed-tensors": "transformers + compressed-tensors (`AutoModelForCausalLM.from_pretrained(DIR)`; a Llama 4 "
                          "with its vision tower: `Llama4ForConditionalGeneration`), vLLM (`vllm serve DIR`)",
    "compressed-tensors-asym": "transformers + compressed-tensors (`from_pretrained(DIR, quantization_config="
                               "CompressedTensorsConfig(dequantize=True))`: transformers' compressed mode does not "
                               "take packed zero points; that mode decompresses every module with one grid), "
                               "vLLM (`vllm serve DIR`)",
    "gguf": "llama.cpp (`llama-cli -m FILE`; with a Llama 4's projector file, `llama-mtmd-cli -m FILE --mmproj "
            "MMPROJ --image IMG`), llama-cpp-python (`Llama(model_path=FILE)`)",
}
def moe_packed_caution(bundle: Bundle, fmt: str) -> str | None:
    """Which clients compute garbage from a GPTQ/AWQ export of a mixture of experts, without an
    error: transformers keeps Llama 4's fused experts at their random initial weights (it
    unfuses only compressed-tensors checkpoints), and GPTQModel 7.6's llama4 definition leaves
    the dense layers' MLP uninitialised where MoE and dense layers interleave (Maverick). None
    for other exports."""
    text = bundle.text_config
    layers = [bundle.table.plan(text, index).moe is not None for index in range(text.num_hidden_layers)]
    if fmt not in ("gptq", "awq") or not any(layers):
        return None
    wrong = "transformers and GPTQModel" if not all(layers) else "transformers (GPTQModel loads it)"
    return f"{wrong} load this mixture of experts without an error but compute garbage: serve it with vLLM, or " \
           "export compressed-tensors for transformers"


def loading_hint(bundle: Bundle, fmt: str) -> str:
    """What loads an export of `bundle` in format `fmt`, for its card."""
    if caution := moe_packed_caution(bundle, fmt):
        return f"vLLM (`vllm serve DIR`); {caution}"
    sym = bundle.quant["sym"] and all(grid.get("sym", True) for grid in bundle.overridden_grids().values())
    return LOADING["compressed-tensors-asym"] if fmt == "compressed-tensors" and not sym else LOADING[fmt]


def file_records(paths: list[Path], root: Path) -> dict[str, dict]:
    """{path relative to root (`..` where it lies elsewhere): sha256 and size}."""
    return {os.path.relpath(path, root): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(paths)}


# What vLLM does with negative scales, read from its source (docs/exports.md): its default kernels multiply by them
SIGNED_SCALE_CAUTION = (
    "**Scales of either sign.** Loaders that compute `scale * (q - zero)` run these weights as they are: transformers, "
    "GPTQModel, and vLLM's default kernels (Marlin, Machete, exllama, the WNA16 MoE kernels). Do not serve them with "
    "vLLM's opt-in W4A8-INT8 Marlin mode (`VLLM_MARLIN_INPUT_DTYPE=int8`): it re-quantizes the scales to unsigned "
    "16-bit integers, which breaks negative ones.")


def model_card(bundle: Bundle | None, fmt: str, detail: str, name: str = "", report_dir: Path | None = None) -> str:
    """The README.md text of an export of `bundle` in format `fmt` (`detail`: e.g. the GGUF
    type); with no bundle, a float model `name` re-quantized by the exporter. `report_dir`: a
    `validate` report whose summary the card quotes."""
    if bundle is None:
        return (f"# {name} — {fmt} {detail}\n\nRound-to-nearest by the exporter ({fmt} {detail}), no calibration: "
                f"written by maverick-quant {__version__} as a baseline.\n\nLoad with: {LOADING[fmt]}\n"
                + validation_section(report_dir))
    manifest, recipe = bundle.manifest, bundle.manifest["recipe"]
    weights, calibration = recipe["weights"], manifest.get("calibration") or {}
    grid = f"{weights['bits']}-bit, group {weights['group_size']}, {'symmetric' if weights['sym'] else 'asymmetric'}"
    if weights.get("signed_scale"):
        grid += f" (llama.cpp Q4_0's scale rule: max-magnitude weight / -{2 ** (weights['bits'] - 1)}, scales of either sign)"
    if weights.get("clip_search"):
        grid += ", each group's range searched for the least |w - q|^2.4"
    lines = [
        f"# {Path(manifest['source']['model_dir']).name} — {fmt} {detail}".rstrip(),
        "",
        f"Compressed with maverick-quant {__version__} (bundle written by {manifest.get('tool_version')}).",
        "",
        "| | |",
        "|---|---|",
        f"| source | `{manifest['source']['model_dir']}` ({', '.join(manifest['source']['architecture'])}) |",
        f"| source fingerprint | `{manifest['source']['fingerprint']}` |",
        f"| method | {recipe['method']}, {grid} |",
        f"| calibration | {calibration.get('samples', 0)} x {calibration.get('seq_len', 0)} tokens of "
        f"`{calibration.get('source', 'none')}` (data sha256 `{calibration.get('data_sha256', '-')}`) |",
        f"| format | {fmt} {detail} |",
        *override_rows(bundle),
        f"| load with | {loading_hint(bundle, fmt)} |",
    ]
    if weights.get("signed_scale") and fmt != "gguf":
        lines += ["", SIGNED_SCALE_CAUTION]
    return "\n".join(lines) + "\n" + validation_section(report_dir)


def validation_section(report_dir: Path | None) -> str:
    """The card's summary of the `validate` report in `report_dir` ("" without one)."""
    if report_dir is None:
        return ""
    summary = load_json_object(Path(report_dir) / "report.json", "a validation report")
    quoted = {key: summary.get(key) for key in ("protocol", "reference", "candidate", "ppl_ratio", "kl",
                                                "top1_agreement", "hellaswag", "gates") if key in summary}
    return "\n".join(["", f"## Validation ({summary.get('candidate_model', 'candidate')} against "
                           f"{summary.get('reference_model', 'the reference')})", "", "```json",
                       json.dumps(quoted, indent=2, default=str), "```"]) + "\n"


def bundle_manifest_sha256(bundle: Bundle) -> str:
    """sha256 of the bundle's manifest.json, which hashes every file of the bundle: what its
    exports record, and validation reports of it or of them (recorded_bundle)."""
    return sha256_file(bundle.root / MANIFEST)


def recorded_bundle(candidate: Path) -> str | None:
    """bundle_manifest_sha256 of the bundle `candidate` is (a bundle folder) or was exported from
    (an export folder, or a GGUF through its sidecar manifest); None where nothing records one
    (a float model, a float model's GGUF, a GGUF from elsewhere, an export older than the record)."""
    candidate = Path(candidate)
    if candidate.is_dir() and manifest_format(candidate) == BUNDLE_FORMAT:
        return sha256_file(candidate / MANIFEST)
    found = candidate_manifest(candidate).get("bundle_manifest_sha256")
    return found if isinstance(found, str) else None


def candidate_manifest(candidate: Path) -> dict:
    """The manifest of a bundle or directory export (its manifest.json) or of a GGUF (its sidecar
    `.manifest.json`); {} where there is none or it is not a JSON object."""
    candidate = Path(candidate)
    return read_json_object(gguf_sidecars(candidate)[1] if candidate.is_file() else candidate / "manifest.json") or {}


def check_report_describes(report_dir: Path, source_fingerprint: str, bundle: Bundle | None) -> list[str]:
    """InputError when the `validate` report in `report_dir`, which an export's card would quote,
    measured something else than the export: a candidate against another reference model than
    the one quantized (`source_fingerprint`), or a candidate that is not `bundle` nor one of its
    exports (without a bundle, a float model's GGUF: a candidate that is no bundle's). Returns
    what the report does not record (written by an older version), unchecked; a key it holds
    as null is a mismatch, not an omission."""
    report = load_json_object(Path(report_dir) / "report.json", "a validation report")
    expected = {"reference_fingerprint": (source_fingerprint, "the reference model it was measured against is not "
                                                              "the model this export was quantized from"),
                "candidate_bundle_manifest_sha256": (bundle_manifest_sha256(bundle) if bundle is not None else None,
                                                     "it validated another bundle, an export of another bundle, or "
                                                     "a candidate of no bundle" if bundle is not None else
                                                     "it validated a bundle or one of its exports, not a float model's "
                                                     "GGUF")}
    unchecked = []
    for key, (ours, why) in expected.items():
        if key not in report:
            unchecked.append(key)
        elif report[key] != ours:
            theirs = "null" if report[key] is None else f"{str(report[key])[:12]}..."
            raise InputError(f"--report {report_dir}: {why} (its {key} {theirs}, this export's "
                             f"{'null' if ours is None else ours[:12] + '...'}); pass the report of a validation of "
                             "this export's weights")
    return unchecked


def override_rows(bundle: Bundle) -> list[str]:
    """Model-card rows naming the linears a per-module override took off the run's grid: those
    kept in float and those on another bit width (with the recipe's patterns)."""
    recipe, rows = bundle.manifest["recipe"], []
    patterns = lambda key: "`, `".join(p.replace("|", "\\|") for p in recipe.get(key, []))  # noqa: E731 (| splits a table cell)
    kept = [bundle.table.prefix(index) + name for index in range(len(bundle.manifest["layers"]))
            for name in bundle.kept_float(index)]
    if kept:
        rows.append(f"| kept in float | {len(kept)} linears matching `{patterns('keep_float')}` "
                    f"(e.g. `{kept[0]}`) |")
    widths: dict[int, list[str]] = {}
    for module, grid in bundle.overridden_grids().items():
        widths.setdefault(grid["bits"], []).append(module)
    for bits, modules in sorted(widths.items()):
        rows.append(f"| {bits}-bit | {len(modules)} linears matching `{patterns('bits_overrides')}` "
                    f"(e.g. `{modules[0]}`) |")
    return rows


def write_artifact_files(bundle: Bundle, out_dir: Path, fmt: str, detail: str = "", report_dir: Path | None = None) -> None:
    """Model card and manifest of a directory export (every file in `out_dir` hashed)."""
    write_text_atomic(out_dir / "README.md", model_card(bundle, fmt, detail, report_dir=report_dir))
    files = [path for path in out_dir.rglob("*") if path.is_file() and path.name != "manifest.json"]
    write_json_atomic(out_dir / "manifest.json", {"format": fmt, "detail": detail, "tool_version": __version__,
                                                  "source": bundle.manifest["source"],
                                                  "bundle_manifest_sha256": bundle_manifest_sha256(bundle),
                                                  "files": file_records(files, out_dir)})


def write_gguf_sidecars(bundle: Bundle | None, name: str, gguf_path: Path, detail: str,
                        report_dir: Path | None = None, extra_files: list[Path] = ()) -> None:
    """Model card and manifest beside a GGUF file (of a bundle, or of the float model `name`);
    `extra_files` (an mmproj GGUF) are hashed into the same manifest."""
    gguf_path = Path(gguf_path)
    card, manifest = gguf_sidecars(gguf_path)
    source = bundle.manifest["source"] if bundle is not None else {"model_dir": name}
    from_bundle = {"bundle_manifest_sha256": bundle_manifest_sha256(bundle)} if bundle is not None else {}
    # the manifest first: an interrupt between the two leaves a verifiable GGUF without its card,
    # never a card beside a GGUF that nothing verifies
    write_json_atomic(manifest,
                      {"format": "gguf", "detail": detail, "tool_version": __version__, "source": source, **from_bundle,
                       "files": file_records([gguf_path, *extra_files], gguf_path.parent)})
    write_text_atomic(card, model_card(bundle, "gguf", detail, name, report_dir))


def recorded_source_fingerprint(candidate: Path) -> str | None:
    """The fingerprint of the model a bundle, a directory export or a GGUF (through its sidecar
    manifest) was quantized from, as its manifest records it; None where nothing records one
    (a float model, a GGUF from elsewhere, an unreadable manifest)."""
    source = candidate_manifest(candidate).get("source")
    return source.get("fingerprint") if isinstance(source, dict) else None


def gguf_sidecars(gguf_path: Path) -> list[Path]:
    """The model card and manifest written beside a GGUF file (`write_gguf_sidecars`)."""
    gguf_path = Path(gguf_path)
    return [gguf_path.with_name(gguf_path.name + suffix) for suffix in (".README.md", ".manifest.json")]


def verify_manifest(manifest_path: Path, complete: bool = True) -> list[str]:
    """Files listed in a manifest whose size or sha256 differ (or that are missing), and, for a
    `complete` manifest (a bundle's or an export directory's, which lists every file of its
    folder), files of the folder it does not list: a stray model.safetensors beside a sharded
    export is what transformers loads first. Hidden files and folders (`.gitattributes`, the
    `.cache/` of a Hub download) are not the artifact's and are not counted. (A GGUF's sidecar
    manifest is not complete: other files may share its folder.)"""
    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    root, bad = manifest_path.parent, []
    for name, record in manifest["files"].items():
        path = root / name
        if not path.is_file() or path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
            bad.append(name)
    if complete:
        listed = set(manifest["files"]) | {manifest_path.name}
        present = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
        bad += [f"{name} (not in the manifest)" for name in sorted(path.as_posix() for path in present
                                                                    if not any(part.startswith(".") for part in path.parts))
                if name not in listed]
    return bad
