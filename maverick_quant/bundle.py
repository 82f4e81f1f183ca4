"""The bundle: the one intermediate artifact between quantize and export/validate.

Layout of a bundle directory:
    manifest.json                   recipe, source fingerprint, calibration provenance,
                                    per-layer stats, sha256 and size of every file
    config.json, tokenizer files    copied from the source model
    passthrough.safetensors         embeddings, final norm, lm_head (original dtype)
    layers/layer-00007.safetensors  one decoder layer: for each quantized linear `m`
                                    `m.codes` (uint8 [N, K], two 4-bit codes per byte when
                                    bits <= 4: [N, K/2]), `m.scales` fp16 [N, G],
                                    `m.zeros` uint8 [N, G]; norms etc. under their own names.
                                    On the Q4_K grid (compress/kquant.py) `m.scales` and
                                    `m.zeros` are the uint8 6-bit sc and m [N, K/32], and
                                    `m.super_scales`, `m.super_mins` fp16 [N, K/256] d, dmin;
                                    on Q4_1's own grid sc = m = 1 and d, dmin are [N, K/32].
                                    A linear a bits override put on another grid has its
                                    changed fields (e.g. {"bits": 8}) as `weights` in its
                                    entry of the layer record's `quantized` (Bundle.tensor_quant).
    layers/layer-00007.json         that layer's stats (GPTQ loss, damping, seconds), written
                                    after its tensors: a layer is complete iff both exist

Every file is written under a temporary name and renamed, so a killed run leaves only
complete layers behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from maverick_quant.checkpoint import (TORCH_DTYPES, TensorInfo, load_json_object, read_rows, read_safetensors_header,
                                       read_tensor, require_exists, sha256_file)
from maverick_quant.outputs import is_temporary, save_safetensors_atomic, write_json_atomic
from maverick_quant.model_config import load_model_config
from maverick_quant.arch.base import FusedExpertsBuilder
from maverick_quant.compress.pack import pack_nibbles, unpack_nibbles
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.errors import InputError

MANIFEST = "manifest.json"
AUDIT = "audit.json"
PASSTHROUGH = "passthrough.safetensors"
BUNDLE_FORMAT = "maverick-quant-bundle"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # a vision model's image processing


QUANTIZED_PARTS = ("codes", "scales", "zeros", "super_scales", "super_mins")


def _nibble_packed(bits: int, in_features: int) -> bool:
    return bits <= 4 and in_features % 2 == 0


def encode_quantized(name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The bundle's tensors for one quantized linear `name` (module path, no `.weight`)."""
    codes = weight.codes
    if _nibble_packed(weight.bits, codes.shape[-1]):
        codes = pack_nibbles(codes)
    if weight.offset_grid:
        return {f"{name}.codes": codes, f"{name}.scales": weight.scales, f"{name}.zeros": weight.zeros,
                f"{name}.super_scales": weight.super_scales.half(), f"{name}.super_mins": weight.super_mins.half()}
    return {f"{name}.codes": codes, f"{name}.scales": weight.scales.half(), f"{name}.zeros": weight.zeros}


def decode_quantized(name: str, tensors: dict[str, torch.Tensor], shape: list[int], bits: int, group_size: int) -> QuantizedWeight:
    codes = tensors[f"{name}.codes"]
    if _nibble_packed(bits, shape[-1]):
        codes = unpack_nibbles(codes)
    supers = [tensors.get(f"{name}.super_scales"), tensors.get(f"{name}.super_mins")]
    return QuantizedWeight(codes, tensors[f"{name}.scales"], tensors[f"{name}.zeros"], bits, group_size, *supers)


def layer_file(index: int) -> str:
    return f"layers/layer-{index:05d}.safetensors"


def expert_file(index: int, first: int) -> str:
    """Routed experts [first, first + count) of layer `index`, stacked [count, N, K] per linear."""
    return f"layers/layer-{index:05d}-experts-{first:05d}.safetensors"


def copy_model_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Copy config.json and the tokenizer, generation and image-processor files that exist;
    returns their names."""
    copied = []
    for name in ("config.json", *TOKENIZER_FILES, *PROCESSOR_FILES):
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, out_dir / name)
            copied.append(name)
    return copied


class BundleWriter:
    """Writes a bundle layer by layer into `root` (a temporary or partial directory)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "layers").mkdir(parents=True, exist_ok=True)

    def write_layer(self, index: int, prefix: str, quantized: dict[str, QuantizedWeight],
                    passthrough: dict[str, torch.Tensor], stats: dict[str, Any]) -> None:
        """Tensors of decoder layer `index` (names relative to `prefix`), then its stats file."""
        tensors = {}
        for name, weight in quantized.items():
            tensors.update(encode_quantized(prefix + name, weight))
        tensors.update({prefix + name: t for name, t in passthrough.items()})
        path = self.root / layer_file(index)
        save_safetensors_atomic(tensors, path)
        record = {"file": layer_file(index), "sha256": sha256_file(path), "prefix": prefix,
                  "quantized": {name: {"shape": list(w.shape), **stats.get(name, {})} for name, w in quantized.items()},
                  **{k: v for k, v in stats.items() if k not in quantized}}
        write_json_atomic(path.with_suffix(".json"), record)

    def layer_record(self, index: int) -> dict[str, Any]:
        """The stats record `write_layer` wrote for finished layer `index`."""
        return json.loads((self.root / layer_file(index)).with_suffix(".json").read_text())

    def write_experts(self, index: int, name_prefix: str, first: int,
                      quantized: dict[str, QuantizedWeight]) -> dict[str, Any]:
        """One chunk of routed experts of layer `index`: {linear name: QuantizedWeight [count, N, K]},
        stored as "{name_prefix}{linear name}.codes" etc.; returns the chunk's record."""
        tensors = {}
        for name, weight in quantized.items():
            tensors.update(encode_quantized(name_prefix + name, weight))
        path = self.root / expert_file(index, first)
        save_safetensors_atomic(tensors, path)
        count = next(iter(quantized.values())).shape[0]
        return {"file": expert_file(index, first), "sha256": sha256_file(path), "first": first, "count": count,
                "prefix": name_prefix, "shapes": {name: list(w.shape) for name, w in quantized.items()}}

    def read_experts(self, record: dict, bits: int, group_size: int) -> dict[str, QuantizedWeight] | None:
        """The chunk `record` (as `write_experts` returned it) read back, or None when its file
        is missing or is not the file the record describes (sha256)."""
        from safetensors.torch import load_file

        path = self.root / record["file"]
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            return None
        tensors = load_file(str(path))
        return {name: decode_quantized(record["prefix"] + name, tensors, shape, bits, group_size)
                for name, shape in record["shapes"].items()}

    def completed_layers(self) -> set[int]:
        """Indices of layers whose tensors and stats are both on disk, each checked as a resumed
        run goes on from them: every finished file (layer and expert chunks) is a whole
        safetensors file (its header read: a truncated one is caught), and the last finished
        layer's files still have the sha256 recorded when they were written (all of them would
        be hashing the whole bundle, 200 GB on Maverick, at every resume). InputError otherwise,
        keeping the work: a finished layer cannot be redone (the hidden states entering it are
        gone), so the file must be restored, or the run started over with --force."""
        records = {}
        for stats in sorted((self.root / "layers").glob("layer-*.json")):
            if stats.with_suffix(".safetensors").is_file():
                records[int(stats.stem.split("-")[1])] = json.loads(stats.read_text())
        parts = {index: [record, *record.get("experts", {}).get("chunks", [])] for index, record in records.items()}
        damaged = [part["file"] for index in parts for part in parts[index] if not self._whole_file(part["file"])]
        if records and not damaged:
            last = max(records)
            damaged = [part["file"] for part in parts[last] if sha256_file(self.root / part["file"]) != part["sha256"]]
        if damaged:
            raise InputError(f"{self.root}: finished layer files changed since they were written ({', '.join(damaged[:3])}"
                             f"{'...' if len(damaged) > 3 else ''}: missing, cut short or another sha256); a finished "
                             "layer cannot be redone: restore the file, or pass --force to start over", keep_work=True)
        return set(records)

    def _whole_file(self, name: str) -> bool:
        """Whether the safetensors file `name` (under the root) is there and whole (its header
        read and its data section ending at the end of the file)."""
        try:
            read_safetensors_header(self.root / name)
        except (OSError, InputError):
            return False
        return True

    def write_passthrough(self, tensors: dict[str, torch.Tensor]) -> None:
        save_safetensors_atomic(tensors, self.root / PASSTHROUGH)

    def finish(self, manifest: dict[str, Any], num_layers: int) -> dict[str, Any]:
        """Gather layer stats and file hashes into manifest.json; returns the manifest. The layer
        and expert files keep the sha256 recorded when each was written (and flushed to the
        disk), so a terabyte bundle is not hashed twice; the other files are hashed here."""
        layers = [self.layer_record(i) for i in range(num_layers)]
        audit = [{"layer": i, **record} for i, layer in enumerate(layers)
                 for record in layer.get("experts", {}).get("audit", [])]
        if audit:
            write_json_atomic(self.root / AUDIT, {"experts": audit})
        recorded = {record["file"]: record["sha256"] for layer in layers
                    for record in [layer, *layer.get("experts", {}).get("chunks", [])]}
        files = {}
        for path in sorted(self.root.rglob("*")):
            name = path.relative_to(self.root).as_posix()
            if path.is_file() and is_temporary(path):  # a killed write's (a resumed run's work directory)
                path.unlink()
            elif path.is_file() and path.name != MANIFEST:
                files[name] = {"sha256": recorded.get(name) or sha256_file(path), "bytes": path.stat().st_size}
        manifest = {"format": BUNDLE_FORMAT, "format_version": 1, **manifest, "layers": layers, "files": files}
        write_json_atomic(self.root / MANIFEST, manifest)
        return manifest


class ReadOnlyWriter(BundleWriter):
    """The writer of a process that writes nothing (ranks > 0 of an expert-parallel run, see
    distributed.py): it reads rank 0's work directory `root` (finished layers) and discards writes."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def write_layer(self, *args, **kwargs) -> None:
        pass

    def write_experts(self, index: int, name_prefix: str, first: int, quantized: dict[str, QuantizedWeight]) -> dict:
        return {"first": first, "written_by": "rank 0"}

    def write_passthrough(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def finish(self, manifest: dict[str, Any], num_layers: int) -> dict[str, Any]:
        return manifest


class Bundle:
    """A finished bundle opened for reading; also a `WeightSource` for streaming, whose float
    tensors are dequantized on the `device` its readers ask for (`dequantizes`)."""

    dequantizes = True

    def __init__(self, root: Path | str):
        self.root = Path(root)
        require_exists(self.root)
        if not (self.root / MANIFEST).is_file():
            raise InputError(f"{self.root}: not a bundle (no {MANIFEST})")
        self.manifest = load_json_object(self.root / MANIFEST, "the bundle's manifest")
        if self.manifest.get("format") != BUNDLE_FORMAT:
            raise InputError(f"{self.root / MANIFEST}: format {self.manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        self._check_files_present()
        from maverick_quant.arch.registry import table_for

        self.config = load_model_config(self.root)
        self.table = table_for(self.config, str(self.root / "config.json"))
        self.text_config = self.table.text_config(self.config)
        self.quant = self.manifest["recipe"]["weights"]
        self._passthrough = read_safetensors_header(self.root / PASSTHROUGH)

    def _check_files_present(self) -> None:
        """InputError naming every file the manifest lists that is missing or of another size,
        before anything reads the bundle (a cheap stat per file; `inspect` verifies the hashes)."""
        bad = [f"{name} ({'missing' if not (self.root / name).is_file() else 'size differs from the manifest'})"
               for name, record in self.manifest.get("files", {}).items()
               if not (self.root / name).is_file() or (self.root / name).stat().st_size != record["bytes"]]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise InputError(f"{self.root}: incomplete bundle: {shown} (copy it again, or quantize again)")

    @property
    def num_layers(self) -> int:
        return len(self.manifest["layers"])

    def quantized_layer(self, index: int, device: torch.device | str = "cpu") -> tuple[dict[str, QuantizedWeight],
                                                                                    dict[str, torch.Tensor]]:
        """Layer `index` as ({relative linear name: QuantizedWeight on `device`}, {relative name:
        float tensor on the host}): the stored (nibble-packed) codes move to `device` and are
        unpacked there."""
        from safetensors.torch import load_file

        record = self.manifest["layers"][index]
        tensors = load_file(str(self.root / record["file"]))
        prefix = record["prefix"]
        coded = {f"{prefix}{name}.{part}" for name in record["quantized"] for part in QUANTIZED_PARTS}
        stored = {key: tensor.to(device) for key, tensor in tensors.items() if key in coded}
        grids = {name: self.tensor_quant(index, name) for name in record["quantized"]}
        quantized = {name: decode_quantized(prefix + name, stored, info["shape"], grids[name]["bits"], grids[name]["group_size"])
                     for name, info in record["quantized"].items()}
        passthrough = {key[len(prefix):]: t for key, t in tensors.items() if key not in coded}
        return quantized, passthrough

    def tensor_quant(self, index: int, name: str) -> dict:
        """The grid (QuantSpec's fields) of layer `index`'s quantized linear `name` (relative):
        the run's, with the fields a bits override changed (its record's `weights`)."""
        return {**self.quant, **self.manifest["layers"][index]["quantized"][name].get("weights", {})}

    def overridden_grids(self) -> dict[str, dict]:
        """{full module name: grid} of every linear a bits override put on its own grid."""
        return {self.table.prefix(index) + name: self.tensor_quant(index, name)
                for index, layer in enumerate(self.manifest["layers"])
                for name, info in layer["quantized"].items() if info.get("weights")}

    def kept_float(self, index: int) -> list[str]:
        """Layer `index`'s linears that a keep_float override left in float (relative names,
        stored as `{name}.weight` among its float tensors)."""
        return list(self.manifest["layers"][index].get("kept_float", []))

    def stored_zero_points(self, index: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(relative module name, uint8 zero points) of every quantized linear of layer `index`:
        [N, G] per linear, and [count, N, G] per linear of each routed-expert chunk (named
        `{experts}.{first}-{last}.{linear}`). Only the `.zeros` tensors are read, about 1/group
        of the codes' bytes, so an export can check every zero point before it writes."""
        from safetensors import safe_open

        record = self.manifest["layers"][index]
        stored = [(record["file"], record["prefix"], {name: name for name in record["quantized"]})]
        for chunk in record.get("experts", {}).get("chunks", []):
            experts = self.table.plan(self.text_config, index).moe.experts
            last = chunk["first"] + next(iter(chunk["shapes"].values()))[0] - 1
            stored.append((chunk["file"], chunk["prefix"],
                           {name: f"{experts}.{chunk['first']}-{last}.{name}" for name in chunk["shapes"]}))
        for file, prefix, names in stored:
            with safe_open(str(self.root / file), framework="pt") as handle:
                for key, module in names.items():
                    yield module, handle.get_tensor(f"{prefix}{key}.zeros")

    def expert_chunks(self, index: int) -> Iterator[tuple[int, dict[str, QuantizedWeight]]]:
        """(first expert, {linear name: QuantizedWeight [count, N, K]}) for each stored chunk
        of layer `index`'s routed experts (none for a dense layer)."""
        from safetensors.torch import load_file

        for chunk in self.manifest["layers"][index].get("experts", {}).get("chunks", []):
            tensors = load_file(str(self.root / chunk["file"]))
            yield chunk["first"], {name: decode_quantized(chunk["prefix"] + name, tensors, shape, self.quant["bits"],
                                                          self.quant["group_size"])
                                   for name, shape in chunk["shapes"].items()}

    def expert_linear_chunks(self, index: int, name: str) -> Iterator[tuple[int, QuantizedWeight]]:
        """Layer `index`'s routed-expert linear `name` (e.g. "gate_proj"), chunk by chunk as
        (first expert, QuantizedWeight [count, N, K]); only that linear's tensors are read."""
        for chunk in self.manifest["layers"][index].get("experts", {}).get("chunks", []):
            yield chunk["first"], self._expert_linear(chunk, name)

    def expert_tensors(self, index: int, first: int, count: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Experts [first, first+count) of layer `index`, dequantized on `device` one expert at a
        time into the fused tensors the model stores (`FusedExpertsBuilder`: one fp32 copy of
        them, plus one expert's); only the chunk files that hold them are read."""
        moe = self.table.plan(self.text_config, index).moe
        fused, found = FusedExpertsBuilder(moe, count), 0
        for chunk in self.manifest["layers"][index]["experts"]["chunks"]:
            count_in_chunk = next(iter(chunk["shapes"].values()))[0]
            lo, hi = max(first, chunk["first"]), min(first + count, chunk["first"] + count_in_chunk)
            if lo >= hi:
                continue
            found += hi - lo
            wanted = slice(lo - chunk["first"], hi - chunk["first"])
            for linear in moe.expert_linears:
                weight = self._expert_linear(chunk, linear.name, device, wanted)
                for expert in range(hi - lo):
                    fused.add(linear.name, lo - first + expert, weight[expert].dequantize()[None])
        if found != count:
            raise InputError(f"{self.root}: layer {index} holds routed experts {first}..{first + count - 1} "
                             f"only in part ({found} of {count} in its chunk files)")
        return fused.fused

    def _expert_linear(self, chunk: dict, name: str, device: torch.device | str = "cpu",
                       experts: slice = slice(None)) -> QuantizedWeight:
        """One linear of one stored expert chunk, QuantizedWeight [count, N, K] on `device` (the
        chunk's `experts` only: their packed codes move there and are unpacked there)."""
        key = chunk["prefix"] + name
        tensors = {f"{key}.{part}": tensor[experts].to(device) for part, tensor in self._stored_expert_parts(chunk, name).items()}
        return decode_quantized(key, tensors, chunk["shapes"][name], self.quant["bits"], self.quant["group_size"])

    def _stored_expert_parts(self, chunk: dict, name: str) -> dict[str, torch.Tensor]:
        """{part: tensor as stored} of one linear of one expert chunk ("codes" nibble-packed
        [count, N, K/2] for 4 bits, "scales" fp16 and "zeros" uint8 [count, N, G], ...): only
        that linear's tensors are read."""
        from safetensors import safe_open

        key = chunk["prefix"] + name
        with safe_open(str(self.root / chunk["file"]), framework="pt") as handle:
            present = set(handle.keys())
            return {part: handle.get_tensor(f"{key}.{part}") for part in QUANTIZED_PARTS if f"{key}.{part}" in present}

    def stored_expert_linear(self, index: int, name: str) -> Iterator[tuple[int, list[int], dict[str, torch.Tensor]]]:
        """(first expert, shape [count, N, K], {part: tensor as stored}) of layer `index`'s
        routed-expert linear `name`, chunk by chunk: the codes stay in their stored (packed) form,
        for readers that take it as it is (the 4-bit kernels' runtime layout)."""
        for chunk in self.manifest["layers"][index].get("experts", {}).get("chunks", []):
            yield chunk["first"], chunk["shapes"][name], self._stored_expert_parts(chunk, name)

    def passthrough_info(self, index: int) -> dict[str, TensorInfo]:
        """Layer `index`'s float tensors (relative name -> header info), read without their data."""
        record = self.manifest["layers"][index]
        coded = {f"{record['prefix']}{name}.{part}" for name in record["quantized"] for part in QUANTIZED_PARTS}
        header = read_safetensors_header(self.root / record["file"])
        return {key[len(record["prefix"]):]: info for key, info in header.items() if key not in coded}

    def model_tensor_info(self, name: str) -> TensorInfo:
        """Header info of a model-level pass-through tensor (a tied lm_head is the embedding)."""
        if name == self.table.lm_head and name not in self._passthrough:
            name = self.table.embed
        return self._passthrough[name]

    def layer_tensors(self, index: int, experts: bool = True, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Layer `index`'s float tensors, the quantized ones dequantized on `device`."""
        quantized, passthrough = self.quantized_layer(index, device)
        out = {**passthrough, **{f"{name}.weight": w.dequantize() for name, w in quantized.items()}}
        moe = self.table.plan(self.text_config, index).moe
        if experts and moe is not None:
            out.update(self.expert_tensors(index, 0, moe.num_experts, device))
        return out

    def model_tensor_names(self) -> list[str]:
        """Names of the model-level pass-through tensors (embed, final norm, untied lm_head)."""
        return list(self._passthrough)

    def model_tensor(self, name: str) -> torch.Tensor:
        return read_tensor(self.model_tensor_info(name))

    def float_dtype(self) -> torch.dtype:
        """The float dtype the model ships in: its embedding's (e.g. bf16 for Maverick)."""
        return TORCH_DTYPES[self.model_tensor_info(self.table.embed).dtype]

    def embedding_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return read_rows(self._passthrough[self.table.embed], rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole dequantized model as a float state dict (small models only)."""
        out = {name: self.model_tensor(name) for name in self.model_tensor_names()}
        for index in range(self.num_layers):
            prefix = self.table.prefix(index)
            out.update({prefix + name: t for name, t in self.layer_tensors(index).items()})
        return out
