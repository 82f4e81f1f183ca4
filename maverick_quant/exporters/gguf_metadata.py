"""GGUF metadata llama.cpp reads: the model's hyper-parameters (and the Llama 4 settings
llama.cpp's graph fixes, checked), llama3 rope factors, and a byte-level BPE vocabulary with
its pre-tokenizer name read from tokenizer.json's structure."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from maverick_quant.compress.gguf_blocks import BlockType
from maverick_quant.errors import InputError


def check_llama4_for_llama_cpp(config) -> None:
    """llama.cpp's llama4 graph fixes what Hugging Face configures: MoE on every
    `interleave_moe_layer_step`-th layer, no rope on every 4th layer, chunked attention of
    8192 tokens, attention temperature tuning on, and q/k L2 norms unless the model has 128
    experts. A GGUF of any other configuration would compute a different function: refused."""
    layers, step = config.num_hidden_layers, config.interleave_moe_layer_step
    expected = {
        "moe_layers": [i for i in range(layers) if step and (i + 1) % step == 0],
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(layers)],
        "layer_types": ["chunked_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)],
        "attention_chunk_size": 8192,
        "attn_temperature_tuning": True,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "use_qk_norm": config.num_local_experts != 128,
    }
    actual = {key: getattr(config, key, None) for key in expected}
    actual["moe_layers"] = list(actual["moe_layers"] or [])
    actual["no_rope_layers"] = list(actual["no_rope_layers"] or [])
    actual["layer_types"] = list(actual["layer_types"] or [])  # which layers attend in chunks (transformers reads it)
    actual["attn_temperature_tuning"] = bool(actual["attn_temperature_tuning"])  # configs write 4 for "on"
    wrong = [f"{key}={actual[key]!r} (llama.cpp: {value!r})" for key, value in expected.items() if actual[key] != value]
    if wrong:
        raise InputError("--format gguf: llama.cpp's llama4 cannot represent this model: " + "; ".join(wrong))


def rope_factors(config) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` [head_dim/2] for llama3-type rope scaling (None otherwise):
    the default inverse frequencies divided by the scaled ones, from transformers' own rope code."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise InputError(f"--format gguf: rope_type {rope_type!r} is not written yet (default and llama3 are)")
    if rope_type != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    dim = scaled.shape[0] * 2
    default = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return default / scaled  # in float32, as transformers and llama.cpp's converter compute both


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_model_metadata(writer, config, arch: str, block_type: BlockType, name: str) -> None:
    """The hyper-parameters llama.cpp reads for `arch` (keys as llama.cpp's converter writes them)."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(getattr(config, "intermediate_size_mlp", None) or config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if arch == "llama4":
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_interleave_moe_layer_step(config.interleave_moe_layer_step)
        writer.add_expert_feed_forward_length(config.intermediate_size)
    if isinstance(block_type, str):  # a float GGUF
        file_type = "ALL_F32" if block_type == "F32" else "MOSTLY_F16"
    else:  # Q4_K_S: Q4_K nearly everywhere
        file_type = "MOSTLY_Q4_K_S" if block_type.k_quant else f"MOSTLY_{block_type.name}"
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


_O200K_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
O200K_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _O200K_CONTRACTION
               + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _O200K_CONTRACTION
               + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama 4's (GPT-4o's o200k) split regex, exactly: llama.cpp replaces it by its own fixed
rules under the names "llama4" and "gpt-4o", so a tokenizer whose regex differs in any way
would be split otherwise in llama.cpp than in transformers."""


def tokenizer_pre(model_dir: Path) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, read from the structure of
    tokenizer.json's pre_tokenizer: ByteLevel with its regex alone is "gpt-2"; individual digits
    then ByteLevel is "smollm"; Llama 4's split regex (GPT-4o's o200k one, which llama.cpp
    splits alike under "llama4" and "gpt-4o"; exactly `O200K_SPLIT`, Isolated) then ByteLevel without its own regex
    is "llama4". None when not recognised (whatever the model's
    architecture: a Llama 4 layout may carry another tokenizer, upcycled from a Llama 3)."""
    pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(step.get("type"), step.get("individual_digits"), step.get("use_regex"), step.get("add_prefix_space"))
             for step in steps]
    if kinds == [("ByteLevel", None, True, False)]:
        return "gpt-2"
    if kinds == [("Digits", True, None, None), ("ByteLevel", None, True, False)]:
        return "smollm"
    split = steps[0] if steps and steps[0].get("type") == "Split" else {}
    if (len(steps) == 2 and (split.get("pattern") or {}).get("Regex") == O200K_SPLIT
            and split.get("behavior") == "Isolated" and split.get("invert") is False
            and kinds[1][0] == "ByteLevel" and kinds[1][2] is False):
        return "llama4"
    return None


def check_byte_level(model_dir: Path) -> None:
    """InputError unless tokenizer.json is a byte-level BPE (GPT-2 style: ByteLevel decoding,
    no byte fallback), the only vocabulary `add_tokenizer` writes right: a SentencePiece-style
    BPE (`▁` spaces, <0x0A> byte tokens) needs llama.cpp's `llama` vocabulary instead."""
    data = json.loads((model_dir / "tokenizer.json").read_text())
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    if model.get("type") != "BPE" or model.get("byte_fallback") or not any(d.get("type") == "ByteLevel" for d in decoders):
        raise InputError(f"{model_dir}/tokenizer.json: model {model.get('type')!r} (byte_fallback "
                         f"{bool(model.get('byte_fallback'))}), decoder {decoder.get('type')!r}; --format gguf writes "
                         "byte-level BPE vocabularies only (GPT-2 style: a ByteLevel decoder, no byte fallback)")


def add_tokenizer(writer, model_dir: Path, vocab_size: int, pre: str) -> None:
    """Byte-level BPE vocabulary (tokens, types, merges, special ids, chat template)."""
    import gguf
    from maverick_quant.calibration.data import load_tokenizer

    tokenizer = load_tokenizer(model_dir)  # tokenizer.json checked by plan_gguf_export
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise InputError(f"{model_dir}: the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
