"""How much of llama.cpp's disagreement with our bundle is its 8-bit activation rounding?

llama.cpp's CPU matmuls for Q4_0 / Q4_1 / Q8_0 weights first round each activation row to
Q8_0 / Q8_1 (blocks of 32 values, scale d = max|x| / 127 stored in fp16, codes round(x / d)).
This script measures, on SmolLM2 and the first `--tokens` tokens of WikiText-2 test:

1. the bundle (round to nearest on the type's grid) run in float by transformers ("ours");
2. the same bundle exported losslessly as a GGUF of that type, run by llama.cpp;
3. the same bundle exported as an F32 GGUF (llama.cpp's F32 matmuls do not round activations);
4. ours again, with every linear's input rounded as llama.cpp rounds it (torch only, no
   llama.cpp): the cost of the activation rounding by itself.

and prints top-1 agreement and mean KL(ours || other) for each. When (2) and (4) are about
as far from (1) as each other, and (3) agrees, the gap is the engine's arithmetic, not the
export.

    python benchmarks/activation_rounding.py --work /tmp/mq-act [--type Q4_0|Q4_1|Q8_0] [--tokens 512]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.test.raw"
Q8_BLOCK = 32


def cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "maverick_quant", *map(str, args)], check=True)


def round_like_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K a multiple of 32) rounded as ggml's quantize_row_q8_0 does: per block of
    32, d = max|x| / 127, q = round(x / d), value q * fp16(d)."""
    blocks = x.reshape(-1, Q8_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
    return (q * d.half().float()).reshape(x.shape)


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ours || theirs)) over positions of logits [L, V], as `validate`
    computes them (validation.metrics.token_metrics; its NLLs are not used here)."""
    from maverick_quant.validation.metrics import token_metrics

    _, _, kl, agree = token_metrics(ours, theirs, torch.zeros(ours.shape[0], dtype=torch.long))
    return float(agree.double().mean()), float(kl.double().mean())


@torch.no_grad()
def bundle_logits(model_dir: Path, bundle_dir: Path, float_dir: Path, ids: list[int], round_inputs: bool) -> torch.Tensor:
    """Logits [L, V] of the bundle's dequantized weights in transformers' LlamaForCausalLM,
    with every linear but lm_head fed `round_like_q8_0` of its input when `round_inputs`."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from maverick_quant.bundle import Bundle

    if not float_dir.exists():
        float_dir.mkdir()
        shutil.copy2(model_dir / "config.json", float_dir / "config.json")
        save_file({n: t.contiguous() for n, t in Bundle(bundle_dir).state_dict().items()}, float_dir / "model.safetensors",
                  metadata={"format": "pt"})
    model = LlamaForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    if round_inputs:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.register_forward_pre_hook(lambda _, inputs: (round_like_q8_0(inputs[0]),))
    return model(input_ids=torch.tensor([ids])).logits[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q4_1", "Q8_0"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--text", type=Path, default=TEXT)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from maverick_quant.sources import smollm2_hf_dir
    from maverick_quant.validation.evaluate import GGUFCandidate

    model_dir, work = smollm2_hf_dir(), args.work / args.type
    if not (work / "f32.gguf").exists():
        cli("quantize", model_dir, "--method", "rtn", "--gguf-grid", args.type, "--out", work / "bundle", "--no-progress", "--force")
        cli("export", work / "bundle", "--format", "gguf", "--gguf-type", args.type, "--out", work / "m.gguf", "--force")
        cli("export", work / "bundle", "--format", "gguf", "--gguf-type", "F32", "--out", work / "f32.gguf", "--force")
    ids = AutoTokenizer.from_pretrained(model_dir)(args.text.read_text(encoding="utf-8")[:40000])["input_ids"][: args.tokens]
    ours = bundle_logits(model_dir, work / "bundle", work / "float", ids, round_inputs=False)
    others = {
        f"llama.cpp, {args.type} GGUF": GGUFCandidate(work / "m.gguf", threads=2).window_logits(ids),
        "llama.cpp, F32 GGUF of the same weights": GGUFCandidate(work / "f32.gguf", threads=2).window_logits(ids),
        "ours with llama.cpp's 8-bit activation rounding (torch)": bundle_logits(model_dir, work / "bundle", work / "float",
                                                                                 ids, round_inputs=True),
    }
    print(f"\nSmolLM2, {args.type} bundle, {len(ids)} tokens of {args.text.name}: against the bundle in float (transformers)\n")
    print("| run | top-1 agreement | mean KL |\n|---|---|---|")
    for name, logits in others.items():
        top1, kl = agreement(ours, logits)
        print(f"| {name} | {top1:.4f} | {kl:.5f} |")


if __name__ == "__main__":
    main()
