"""Lazy, validated reading of Hugging Face safetensors checkpoints (writing: `outputs`).

Reading: `Checkpoint(model_dir)` parses config.json, the shard index and every shard's
header (a few KB each) without touching tensor data. `validate()` checks the whole model
against the architecture table before any work. Tensors are then read one at a time
through safetensors' memory maps, so a model far larger than RAM can be streamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from maverick_quant.compress.finite import all_finite
from maverick_quant.errors import ContentError, InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
CONFIG_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # config.json dtype -> safetensors code
DTYPE_SIZES = {**FLOAT_DTYPES, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file, dtype code (safetensors "F32"...), shape, and
    its byte range [begin, end) in the file (absolute, header included)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0


TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one shard's header; InputError naming the file on any inconsistency.

    Checks: the 8-byte header length fits the file, the JSON parses, every dtype is known,
    every tensor's byte range equals numel * itemsize, lies in the file, and the data
    section's end equals the file size (a truncated or padded shard is refused).
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise InputError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise InputError(f"{path}: truncated or corrupt safetensors header (header claims {header_len} bytes, file has {size})")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (expected a JSON object)")
    header.pop("__metadata__", None)
    return _tensor_infos(path, header, data_size=size - 8 - header_len, data_start=8 + header_len)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_fields(path: Path, name: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each checked for its type and sign."""
    malformed = InputError(f"{path}: tensor {name!r} has a malformed header entry {entry!r} (expected "
                           '{"dtype": str, "shape": [int >= 0, ...], "data_offsets": [begin, end]})')
    if not isinstance(entry, dict):
        raise malformed
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(map(_is_count, shape))):
        raise malformed
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise malformed
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InputError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _tensor_infos(path: Path, header: dict, data_size: int, data_start: int) -> dict[str, TensorInfo]:
    """The header's tensors, checked to tile the data section exactly: sorted by offset, each
    starts where the one before ends, from 0 to the section's end (safetensors' own rule), so no
    two tensors share bytes and no bytes go unexplained."""
    infos, spans = {}, []
    for name, entry in header.items():
        dtype, shape, begin, end = _entry_fields(path, name, entry)
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * DTYPE_SIZES[dtype]:
            raise InputError(f"{path}: tensor {name!r} byte range {begin}..{end} does not match shape {list(shape)} {dtype}")
        spans.append((begin, end, name))
        infos[name] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    data_end = 0
    for begin, end, name in sorted(spans):
        if begin != data_end:
            raise InputError(f"{path}: corrupt safetensors file: tensor {name!r} byte range {begin}..{end} "
                             f"{'overlaps the tensor before it' if begin < data_end else 'leaves unexplained bytes before it'} "
                             f"(expected it to start at {data_end})")
        data_end = end
    if data_end > data_size:
        raise InputError(f"{path}: truncated safetensors file: tensors need {data_end} data bytes, file has {data_size}")
    if data_end < data_size:
        raise InputError(f"{path}: corrupt safetensors file: {data_size - data_end} unexplained bytes after the tensors")
    return infos


def _shard_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """(the shard files named by the index (checked to stay inside model_dir), the index's
    {tensor: shard}), or ([the single file], None)."""
    index_path = model_dir / INDEX_NAME
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{index_path}: not a valid safetensors index ({exc!r})") from None
        if not isinstance(weight_map, dict):
            raise InputError(f"{index_path}: not a valid safetensors index (weight_map is a "
                             f"{type(weight_map).__name__}, expected an object of tensor name -> shard file)")
        files = []
        for name, rel in weight_map.items():
            # checked by name, not by resolving links: a Hugging Face cache snapshot's shards are
            # links to ../../blobs/<sha256>, outside the snapshot folder by design
            if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise InputError(f"{index_path}: tensor {name!r} points outside the model directory ({rel!r})")
            if not (model_dir / rel).exists():
                raise InputError(f"{index_path}: tensor {name!r} is in {rel!r}, which is missing from {model_dir}")
            files.append(model_dir / rel)
        return sorted(set(files)), weight_map
    if (model_dir / SINGLE_NAME).exists():
        return [model_dir / SINGLE_NAME], None
    singles = sorted(model_dir.glob("*.safetensors"))
    if len(singles) == 1:
        return singles, None
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(
            f"{model_dir}: only pickle checkpoints found ({', '.join(pickles)}); maverick-quant never loads pickles "
            "because unpickling can run arbitrary code. Convert the model to safetensors first."
        )
    raise InputError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME} found")


def _check_index(model_dir: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """InputError unless every tensor the index names is in some shard. (transformers and vLLM
    load every tensor of the shard files the index lists, wherever the index places it, so a
    tensor in another shard than indexed, or not indexed, is read as they read it.)"""
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise InputError(f"{model_dir / INDEX_NAME}: {len(missing)} tensors it indexes are in no shard "
                         f"(e.g. {missing[0]!r}, indexed in {weight_map[missing[0]]})")


NEVER_DOWNLOADS = ("maverick-quant reads local folders only and never downloads; fetch the model first, e.g. "
                   "`huggingface-cli download NAME --local-dir DIR`")


def require_exists(path: Path, model: bool = False) -> None:
    """InputError when nothing is at `path` (said as such, not as a folder of the wrong kind; for
    a `model` folder, a relative ORG/NAME is taken for a model hub's name, never looked up)."""
    path = Path(path)
    if path.exists():
        return
    if model and not path.is_absolute() and len(path.parts) == 2:
        raise InputError(f"{path}: not a model folder here ({NEVER_DOWNLOADS})")
    raise InputError(f"{path}: no such file or directory")


class Checkpoint:
    """A Hugging Face model directory read lazily: headers now, tensor data on demand."""

    def __init__(self, model_dir: Path | str):
        self.model_dir = Path(model_dir)
        require_exists(self.model_dir, model=True)
        if not (self.model_dir / "config.json").is_file():
            raise InputError(f"{self.model_dir}: not a model directory (no config.json)")
        self.files, weight_map = _shard_files(self.model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, info in read_safetensors_header(path).items():
                if name in self.tensors:
                    raise InputError(f"{self.model_dir}: tensor {name!r} is stored twice, in "
                                     f"{self.tensors[name].file.name} and in {path.name}")
                self.tensors[name] = info
        if weight_map is not None:
            _check_index(self.model_dir, weight_map, self.tensors)

    def load_config(self):
        """The transformers config (never trust_remote_code): `model_config.load_model_config`."""
        from maverick_quant.model_config import load_model_config

        return load_model_config(self.model_dir)

    def validate(self, expected: dict[str, tuple[int, ...]], config_dtype: str | None = None) -> None:
        """Every expected tensor present with that shape and a float dtype (the one config.json
        names as `dtype`/`torch_dtype`, when it names one; vectors such as norm weights may be
        stored in F32 beside 16-bit matrices, as some releases do and transformers loads),
        before any work."""
        wanted = CONFIG_DTYPES.get(str(config_dtype).removeprefix("torch."))
        problems = []
        for name, shape in expected.items():
            info = self.tensors.get(name)
            if info is None:
                problems.append(f"missing tensor {name!r} (expected shape {list(shape)})")
            elif info.shape != tuple(shape):
                problems.append(f"tensor {name!r} in {info.file.name} has shape {list(info.shape)}, config.json implies {list(shape)}")
            elif info.dtype not in FLOAT_DTYPES:
                problems.append(f"tensor {name!r} in {info.file.name} has dtype {info.dtype}, expected one of {sorted(FLOAT_DTYPES)}")
            elif wanted is not None and info.dtype != wanted and not (info.dtype == "F32" and len(shape) == 1):
                problems.append(f"tensor {name!r} in {info.file.name} has dtype {info.dtype}, config.json says {config_dtype}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise InputError(f"{self.model_dir}: checkpoint does not match its config: {shown}")

    def get(self, name: str, check_finite: bool = True) -> torch.Tensor:
        """One tensor, read with pread into its own buffer; InputError naming it if absent or
        not finite. (Reading instead of memory-mapping keeps file pages out of this process's
        resident set: only the tensors in use count against memory.)"""
        info = self.tensors.get(name)
        if info is None:
            raise InputError(f"{self.model_dir}: tensor {name!r} not found")
        if info.dtype not in TORCH_DTYPES:
            raise InputError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which maverick-quant cannot read "
                             f"(it reads {', '.join(TORCH_DTYPES)})")
        tensor = read_tensor(info)
        if check_finite and not all_finite(tensor):
            raise ContentError(f"{info.file}: tensor {name!r} contains NaN or Inf values")
        return tensor

    def get_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (sorted, unique) of tensor `name`, checked finite (see `read_rows`)."""
        info = self.tensors.get(name)
        if info is None:
            raise InputError(f"{self.model_dir}: tensor {name!r} not found")
        tensor = read_rows(info, rows)
        if not all_finite(tensor):
            raise ContentError(f"{info.file}: tensor {name!r} contains NaN or Inf values")
        return tensor

    def fingerprint(self, sample_bytes: int = 1 << 16) -> str:
        """sha256 over config.json and, per shard, its name, size and header, and `sample_bytes`
        of tensor data at the start, the middle and the end of its data section: cheap (192 KiB a
        shard), and a re-saved fine-tune of the same layout (same config and headers, other
        weights) no longer passes for the same model when a run resumes."""
        digest = hashlib.sha256((self.model_dir / "config.json").read_bytes())
        for path in self.files:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                digest.update(path.name.encode() + str(size).encode() + handle.read(header_len))
                begin = 8 + header_len
                for offset in sorted({begin, max(begin, (begin + size - sample_bytes) // 2), max(begin, size - sample_bytes)}):
                    handle.seek(offset)
                    digest.update(handle.read(sample_bytes))
        return digest.hexdigest()


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The tensor at `info` read from disk into a fresh buffer (shape and dtype from the header)."""
    if info.dtype not in TORCH_DTYPES:
        raise InputError(f"{info.file}: dtype {info.dtype} is not readable here")
    buffer = bytearray(info.end - info.begin)
    with open(info.file, "rb") as handle:
        handle.seek(info.begin)
        if handle.readinto(buffer) != len(buffer):
            raise InputError(f"{info.file}: truncated while reading a tensor")
    if not buffer:
        return torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
    return torch.frombuffer(buffer, dtype=TORCH_DTYPES[info.dtype]).reshape(info.shape)


def read_fully(fd: int, target: memoryview, offset: int, path: Path) -> None:
    """Fill `target` with the file's bytes from `offset`. One `preadv` may return fewer bytes
    than asked without being at the end of the file (Linux moves at most 2,147,479,552 bytes a
    call; network and FUSE file systems return less), so it reads on until `target` is full;
    only a read of 0 bytes (the end of the file) means the file is truncated."""
    done = 0
    while done < len(target):
        count = os.preadv(fd, [target[done:]], offset + done)
        if count == 0:
            raise InputError(f"{path}: truncated while reading rows of a tensor (ends {len(target) - done} bytes "
                             f"short of byte {offset + len(target)})")
        done += count


def read_rows(info: TensorInfo, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (sorted, unique int64 [U]) of the tensor at `info` [R, ...] -> [U, ...].

    Reads only those rows, one `preadv` per run of consecutive indices, so an embedding
    lookup costs the rows it uses rather than the whole table (2 GB for Maverick's).
    """
    if info.dtype not in TORCH_DTYPES:
        raise InputError(f"{info.file}: dtype {info.dtype} is not readable here")
    rows = rows.to(torch.int64)
    if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= info.shape[0]):
        raise InputError(f"{info.file}: row index out of range [0, {info.shape[0]}) for a tensor of shape {list(info.shape)}")
    row_bytes = (info.end - info.begin) // max(info.shape[0], 1)
    out = bytearray(row_bytes * rows.numel())
    breaks = (torch.nonzero(rows.diff() != 1).flatten() + 1).tolist()
    with open(info.file, "rb") as handle:
        for first, stop in zip([0, *breaks], [*breaks, rows.numel()]):
            target = memoryview(out)[first * row_bytes : stop * row_bytes]
            read_fully(handle.fileno(), target, info.begin + int(rows[first]) * row_bytes, info.file)
    if not out:
        return torch.empty((0, *info.shape[1:]), dtype=TORCH_DTYPES[info.dtype])
    return torch.frombuffer(out, dtype=TORCH_DTYPES[info.dtype]).reshape(rows.numel(), *info.shape[1:])


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the file is missing, unreadable, not JSON or not
    an object (for files only consulted, such as a folder's manifest.json)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`, or InputError naming the file and `what` it should have been
    (for files a command needs, such as a bundle's manifest or a baseline report)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read {what} ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: cannot read {what} (expected a JSON object, got {type(data).__name__})")
    return data


def manifest_format(folder: Path, strict: bool = False) -> str | None:
    """The `format` that `folder`/manifest.json names (a bundle's, an export's), or None where the
    folder has no readable manifest object naming one (a float model folder, say). `strict`: a
    manifest.json that is there but not a JSON object is InputError naming it (where a damaged
    bundle would otherwise be read as a float model and fail on its tensors)."""
    path = Path(folder) / "manifest.json"
    data = load_json_object(path, "the manifest") if strict and path.is_file() else read_json_object(path) or {}
    found = data.get("format")
    return found if isinstance(found, str) and found else None
