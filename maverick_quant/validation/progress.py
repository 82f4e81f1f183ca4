"""Resumable validation: what a `validate` run has finished, kept beside its report.

Validating Maverick streams the 800 GB reference (and the candidate) once, layer by layer,
for hours; a crash should cost one layer, not the run. The report is built in
`.REPORT.partial` and its state kept in `.REPORT.resume` (resume.resumable_output_dir, as
quantize does):

    run.json                  what is being validated (validation_identity); --resume refuses
                              a run started with other inputs, naming what changed
    layers-NNNNN.safetensors  the hidden states entering layer NNNNN: "reference" and
                              "candidate" [W, L, D] (a GGUF candidate: "reference" only)
    layers.json               {"next_layer", "file", "steps": [one record per finished layer]},
                              written after its tensors, so it never names a half-written file
    evaluation.json / .safetensors  the finished perplexity / KL evaluation (summary, per-token KL)
    benchmark-NAME.json       a finished multiple-choice benchmark (hellaswag, choices)

Every file is written to a temporary name and renamed (outputs.durable_replace).
"""

from __future__ import annotations

import hashlib
import re
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from maverick_quant import __version__
from maverick_quant.outputs import save_safetensors_atomic, write_json_atomic
from maverick_quant.errors import InputError
from maverick_quant.resume import read_layer_tensors, save_layer_progress

LAYERS_FILE = "layers.json"
EDGE_BYTES = 1 << 20  # a GGUF file is fingerprinted by its size and its first and last MiB


SPLIT_GGUF = re.compile(r"(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf")  # llama.cpp's gguf-split names


def split_gguf_parts(path: Path) -> list[Path]:
    """The files of the GGUF `path`: every shard `STEM-0000k-of-0000N.gguf` beside it when it is
    one of a split, else `path`; InputError naming a missing shard."""
    match = SPLIT_GGUF.fullmatch(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    parts = [path.with_name(f"{match['stem']}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]
    missing = [part.name for part in parts if not part.is_file()]
    if missing:
        raise InputError(f"{path}: a split GGUF of {count} files, {', '.join(missing)} missing beside it")
    return parts


def artifact_fingerprint(path: Path) -> str:
    """A cheap sha256 naming what a path holds: a bundle's or export's manifest.json (which
    hashes every file), a float model's config and shard headers (Checkpoint.fingerprint), a
    file's size and first and last MiB (a Maverick GGUF is over 200 GB), with the `.manifest.json`
    sidecar of a GGUF we exported (the file's own bytes count too: a GGUF replaced beside an old
    sidecar, by a killed `export --force` or another tool, is not the file the sidecar hashed).
    A split GGUF (`NAME-00001-of-0000N.gguf`, which llama.cpp loads whole) counts every shard."""
    from maverick_quant.checkpoint import Checkpoint
    from maverick_quant.exporters.artifact import gguf_sidecars

    path = Path(path)
    digest = hashlib.sha256()
    sidecar = gguf_sidecars(path)[1]  # our GGUF exports' manifest (hashes the file)
    if path.is_file():
        if sidecar.is_file():
            digest.update(sidecar.read_bytes())
        for part in split_gguf_parts(path):
            size = part.stat().st_size
            with open(part, "rb") as handle:
                digest.update(str(size).encode() + handle.read(EDGE_BYTES))
                handle.seek(max(0, size - EDGE_BYTES))
                digest.update(handle.read())
    elif (path / "manifest.json").is_file():
        digest.update((path / "manifest.json").read_bytes())
    else:
        digest.update(Checkpoint(path).fingerprint().encode())
    return digest.hexdigest()


def validation_identity(reference: Path, candidate: Path, windows: torch.Tensor, settings: dict) -> dict:
    """What a validate run computes; a resumed run must match it exactly. `settings`: the
    options that change the numbers (protocol, ctx, batch, kernels, device, benchmarks)."""
    from maverick_quant.resume import tensor_sha256

    identity = {"reference": artifact_fingerprint(reference), "candidate": artifact_fingerprint(candidate),
                "windows_sha256": tensor_sha256(windows), "settings": settings, "tool_version": __version__}
    return json.loads(json.dumps(identity, default=str))


@dataclass(frozen=True)
class ValidationState:
    """The state folder of a validate run (`.REPORT.resume`)."""

    folder: Path

    def save_layers(self, next_layer: int, caches: dict[str, torch.Tensor], steps: list[dict]) -> None:
        """Record layers < `next_layer` as finished: the caches entering `next_layer` and
        one JSON record per finished layer (resume.save_layer_progress)."""
        name = f"layers-{next_layer:05d}.safetensors"
        save_layer_progress(self.folder, LAYERS_FILE, {"next_layer": next_layer, "file": name, "steps": steps}, name,
                            caches, "layers-*.safetensors")

    def load_layers(self) -> tuple[int, dict[str, torch.Tensor], list[dict]] | None:
        """(next layer, caches entering it, records of the finished layers), or None when no
        layer was finished; InputError when the caches cannot be read."""
        path = self.folder / LAYERS_FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        caches = read_layer_tensors(self.folder / record["file"], record["next_layer"])
        return int(record["next_layer"]), caches, record["steps"]

    def save_result(self, name: str, result: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Keep a finished part of the run (`name`.json, and `name`.safetensors if `tensors`)."""
        if tensors:
            save_safetensors_atomic(tensors, self.folder / f"{name}.safetensors")
        write_json_atomic(self.folder / f"{name}.json", result)

    def load_result(self, name: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(result, tensors) of a part finished by an earlier attempt, or None."""
        from safetensors.torch import load_file

        path = self.folder / f"{name}.json"
        if not path.is_file():
            return None
        tensors_path = self.folder / f"{name}.safetensors"
        return json.loads(path.read_text()), load_file(str(tensors_path)) if tensors_path.is_file() else {}
