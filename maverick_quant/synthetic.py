"""Llama 4 layout models built from what is at hand, for tests, benchmarks and plans.

`upcycle_to_llama4` turns a dense Llama (SmolLM2) into a `Llama4ForCausalLM` whose experts
see real-text activations: attention and norms copied (q/k rows permuted from the
rotate-half layout of HF Llama to the interleaved pairs Llama 4's complex rotary uses), the
MLP as the shared expert of every MoE layer and as the dense MLP elsewhere, routed experts
as perturbed copies of the MLP, and a random router (real activations have a few dominant
channels, so routing comes out uneven by itself). With `expert_scale=0` the routed experts
output nothing and the model computes exactly the source model's function.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from maverick_quant.bundle import TOKENIZER_FILES
from maverick_quant.checkpoint import Checkpoint
from maverick_quant.outputs import ShardedWriter, atomic_output_dir

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows [heads * d, K] from HF Llama's rotate-half order (pairs (i, i + d/2)) to
    interleaved order (pairs (2i, 2i + 1)), the inverse of HF's conversion permutation."""
    rows, width = weight.shape
    return weight.view(heads, 2, rows // heads // 2, width).transpose(1, 2).reshape(rows, width)


def _llama4_text_config(source: dict, num_experts: int, moe_layers: list[int]) -> dict:
    layers = source["num_hidden_layers"]
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "hidden_size": source["hidden_size"], "intermediate_size": source["intermediate_size"],
        "intermediate_size_mlp": source["intermediate_size"], "num_hidden_layers": layers,
        "num_attention_heads": source["num_attention_heads"], "num_key_value_heads": source["num_key_value_heads"],
        "head_dim": source.get("head_dim") or source["hidden_size"] // source["num_attention_heads"],
        "vocab_size": source["vocab_size"], "rms_norm_eps": source["rms_norm_eps"],
        "max_position_embeddings": source["max_position_embeddings"], "rope_parameters": source["rope_parameters"],
        "num_local_experts": num_experts, "num_experts_per_tok": 1, "moe_layers": moe_layers,
        "interleave_moe_layer_step": 0, "no_rope_layers": [1] * layers, "use_qk_norm": False,
        "attn_temperature_tuning": False, "attention_chunk_size": source["max_position_embeddings"],
        "hidden_act": source.get("hidden_act", "silu"), "tie_word_embeddings": source.get("tie_word_embeddings", False),
        "bos_token_id": source.get("bos_token_id"), "eos_token_id": source.get("eos_token_id"),
        "pad_token_id": source.get("pad_token_id"), "dtype": "float32",
    }


def _moe_tensors(mlp: dict[str, torch.Tensor], num_experts: int, noise: float, expert_scale: float,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Shared expert = the MLP; experts e: gate/up/down = MLP * (1 + noise * N(0,1)), down * expert_scale;
    router [E, D] ~ N(0, 1/D)."""
    gate, up, down = mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"]

    def perturbed(weight: torch.Tensor) -> torch.Tensor:
        return weight * (1 + noise * torch.randn(num_experts, *weight.shape, generator=generator))

    hidden = gate.shape[1]
    return {
        "feed_forward.shared_expert.gate_proj.weight": gate, "feed_forward.shared_expert.up_proj.weight": up,
        "feed_forward.shared_expert.down_proj.weight": down,
        "feed_forward.router.weight": torch.randn(num_experts, hidden, generator=generator) / math.sqrt(hidden),
        "feed_forward.experts.gate_up_proj": torch.cat([perturbed(gate), perturbed(up)], dim=1).transpose(1, 2).contiguous(),
        "feed_forward.experts.down_proj": (expert_scale * perturbed(down)).transpose(1, 2).contiguous(),
    }


def _layer_tensors(checkpoint: Checkpoint, config: dict, index: int, num_experts: int, moe: bool,
                   noise: float, expert_scale: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    get = lambda name: checkpoint.get(f"model.layers.{index}.{name}").float()  # noqa: E731
    out = {f"{name}.weight": get(f"{name}.weight") for name in ATTENTION}
    out["self_attn.q_proj.weight"] = interleave_rotary_rows(out["self_attn.q_proj.weight"], config["num_attention_heads"])
    out["self_attn.k_proj.weight"] = interleave_rotary_rows(out["self_attn.k_proj.weight"], config["num_key_value_heads"])
    out.update({name: get(name) for name in ("input_layernorm.weight", "post_attention_layernorm.weight")})
    mlp = {name: get(f"mlp.{name}.weight") for name in ("gate_proj", "up_proj", "down_proj")}
    if moe:
        out.update(_moe_tensors(mlp, num_experts, noise, expert_scale, generator))
    else:
        out.update({f"feed_forward.{name}.weight": w for name, w in mlp.items()})
    return out


def upcycle_to_llama4(source_dir: Path, out_dir: Path, num_experts: int = 8, moe_every: int = 4,
                      noise: float = 0.05, expert_scale: float = 0.3, seed: int = 0, force: bool = False) -> Path:
    """Write a `Llama4ForCausalLM` built from the dense Llama at `source_dir` (see module doc).

    MoE layers are 1, 1 + moe_every, ...; fp32 safetensors shards of at most 1 GB.
    """
    checkpoint = Checkpoint(source_dir)
    source = json.loads((Path(source_dir) / "config.json").read_text())
    config = _llama4_text_config(source, num_experts, list(range(1, source["num_hidden_layers"], moe_every)))
    generator = torch.Generator().manual_seed(seed)
    with atomic_output_dir(Path(out_dir), force) as tmp:
        writer = ShardedWriter(tmp, 10**9)
        for index in range(config["num_hidden_layers"]):
            tensors = _layer_tensors(checkpoint, config, index, num_experts, index in config["moe_layers"],
                                     noise, expert_scale, generator)
            writer.add_group({f"model.layers.{index}.{name}": t for name, t in tensors.items()})
        model_level = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        writer.add_group({name: checkpoint.get(name).float() for name in model_level if name in checkpoint.tensors})
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, tmp / name)
    return Path(out_dir)


def random_llama4(out_dir: Path, num_experts: int, hidden: int = 512, inter: int = 1024, layers: int = 2,
                  heads: int = 8, kv_heads: int = 2, tokenizer_dir: Path | None = None, seed: int = 0,
                  force: bool = False) -> Path:
    """A random `Llama4ForCausalLM` (MoE on odd layers, top-1) with every tensor of the
    table's expected layout: N(0, 0.02) weights, unit norms, routers whose rows are scaled
    by (e + 1) / E so routing is uneven. For scaling benchmarks and plan checks."""
    from transformers import Llama4TextConfig

    from maverick_quant.arch.llama4 import LLAMA4_CAUSAL

    source = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
              "vocab_size": 49152, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
              "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 2}
    config = _llama4_text_config(source, num_experts, list(range(1, layers, 2)))
    generator = torch.Generator().manual_seed(seed)
    shapes = LLAMA4_CAUSAL.expected_tensors(Llama4TextConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    with atomic_output_dir(Path(out_dir), force) as tmp:
        writer = ShardedWriter(tmp, 10**9)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape)
            else:
                tensor = torch.randn(shape, generator=generator) * 0.02
            if name.endswith("router.weight"):
                tensor *= torch.arange(1, shape[0] + 1)[:, None] / shape[0] * 50
            writer.add_group({name: tensor})
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    return Path(out_dir)
