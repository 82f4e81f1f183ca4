"""Reading a model's config.json as transformers does, never with trust_remote_code, with the
values published configs hold that transformers 5's strict configs refuse read as their
authors meant (`published_quirks_fixed`)."""

from __future__ import annotations

import json
from pathlib import Path

from maverick_quant.errors import InputError


def published_quirks_fixed(config: dict) -> list[str]:
    """Mend, in place, values that published configs hold and transformers 5's strict configs
    refuse; returns what was changed. Llama 4's own configs write `attn_temperature_tuning: 4`
    for "on" (transformers 4.51, vLLM and llama.cpp's converter read it as a truth value)."""
    changed = []
    for section, where in ((config, ""), (config.get("text_config"), "text_config.")):
        value = section.get("attn_temperature_tuning") if isinstance(section, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            section["attn_temperature_tuning"] = bool(value)
            changed.append(f"{where}attn_temperature_tuning: {value} -> {bool(value)}")
    return changed


def load_model_config(folder: Path):
    """The transformers config of `folder`/config.json, never with trust_remote_code; published
    quirks (`published_quirks_fixed`) read as their authors meant. InputError naming the file
    when transformers cannot read it."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from maverick_quant.checkpoint import require_exists

    require_exists(Path(folder), model=True)
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if published_quirks_fixed(data):
            model_type = data.pop("model_type", None)
            if model_type is None:
                raise ValueError("no model_type")
            config = AutoConfig.for_model(model_type, **data)
            config.name_or_path = str(folder)
            return config
        return AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError, StrictDataclassError) as exc:
        raise InputError(f"{path}: cannot be read as a transformers config ({exc})") from None


def check_positions(config, length: int, what: str, where: Path) -> None:
    """InputError when `length` tokens at positions 0 .. length-1 (an evaluation or calibration
    window, a prompt with its new tokens) pass the max_position_embeddings of the model whose
    transformers `config` (or its text config) was read from the folder `where`: positions
    the model and its RoPE scaling were not made for, whose numbers describe no use of it."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < length:
        raise InputError(f"{what}: {length} positions, past the model's max_position_embeddings of {limit} "
                         f"({Path(where) / 'config.json'}); use at most {limit}")
