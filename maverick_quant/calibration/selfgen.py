"""Data-free calibration: text the model generates itself.

Each sample starts from BOS and one vocabulary token drawn by the seed, never an added
(special or reserved) token (as LLM-QAT's data-free recipe does, so samples do not all
open alike), then is sampled with temperature 1 and top-k 50. This loads the whole model with transformers in fp32: fine
for small models; a model larger than the available memory is refused before loading
(`check_fits_in_memory`): generate once on a machine that holds it and pass the text with
--data.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def generate_self_text(model_dir: Path, n_samples: int, max_new_tokens: int, seed: int, batch_size: int = 16) -> list[str]:
    """`n_samples` decoded texts of up to `max_new_tokens` tokens each, deterministic for `seed`."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from maverick_quant.calibration.data import load_tokenizer

    check_fits_in_memory(Path(model_dir))
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False,
                                                 local_files_only=True).eval()
    first = first_tokens(tokenizer, n_samples, seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompts = torch.cat([torch.full((n_samples, 1), bos), first], dim=1)
    texts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, n_samples, batch_size):
            batch = prompts[start : start + batch_size]
            output = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=1.0,
                                    top_k=50, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.eos_token_id,
                                    logits_processor=LogitsProcessorList([_refuse_broken_logits(model_dir)]))
            texts.extend(tokenizer.batch_decode(output[:, 1:], skip_special_tokens=True))
    return texts


def _refuse_broken_logits(model_dir: Path):
    """A transformers logits processor raising InputError naming `model_dir` when a step's
    logits hold NaN or +Inf (a model whose activations overflow): sampling from them failed
    with torch's "probability tensor contains inf, nan" traceback. -Inf is fine: processors
    use it to forbid tokens (min_new_tokens forbids EOS)."""
    from transformers import LogitsProcessor

    from maverick_quant.errors import InputError

    class RefuseBrokenLogits(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if torch.isnan(scores).any() or torch.isposinf(scores).any():
                raise InputError(f"{model_dir}: the model's logits became NaN/Inf while it generated text of its own "
                                 "(data: self); check its weights, or give a text file")
            return scores

    return RefuseBrokenLogits()


def first_tokens(tokenizer, n_samples: int, seed: int) -> torch.Tensor:
    """Each sample's first token [n_samples, 1], drawn uniformly from the vocabulary by `seed`;
    a draw that is an added token (special, control or reserved: Llama 4 reserves about a
    thousand) is drawn again from the same generator, so the other samples keep their draw."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(tokenizer), (n_samples, 1), generator=generator)
    added = set(tokenizer.added_tokens_decoder)
    for row in range(n_samples):
        while int(first[row, 0]) in added:
            first[row, 0] = int(torch.randint(0, len(tokenizer), (1,), generator=generator))
    return first


def check_fits_in_memory(model_dir: Path, available: int | None = None) -> None:
    """InputError, before loading anything, when the whole model in fp32 (4 bytes per element of
    its shards, from their headers) exceeds this machine's available memory (`available` bytes,
    default MemAvailable): Maverick would need 1.6 TB."""
    from maverick_quant.checkpoint import Checkpoint
    from maverick_quant.errors import InputError

    needed = 4 * sum(math.prod(info.shape) for info in Checkpoint(model_dir).tensors.values())
    from maverick_quant import host_memory

    available = host_memory.available_bytes() if available is None else available
    if available is not None and needed > available:
        raise InputError(f"{model_dir}: `self` data generates text with the whole model loaded in fp32, "
                         f"{needed / 2**30:.1f} GiB, and this machine has {available / 2**30:.1f} GiB available: "
                         "generate the text where the model fits (or write it another way) and pass the file instead")
