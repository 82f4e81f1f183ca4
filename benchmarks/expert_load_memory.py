"""Host memory to load one MoE layer's routed experts for the 4-bit kernels (generate,
validate --kernels): as stored (`runtime._routed_experts`, each chunk's packed codes copied
into the stacked tensors) against unpacking every code to a byte, stacking and packing again
(the path it replaced, rebuilt here from the bundle's own readers).

    python benchmarks/expert_load_memory.py --work /tmp/mq-elm [--hidden 1024] [--inter 4096] [--experts 16]

Builds a random Llama 4 text model (one dense layer, one MoE layer), quantizes it with RTN
(4-bit, group 128, in several expert chunks), then loads the MoE layer's experts in a fresh
process per path and prints the peak RSS each added (Linux: the peak is reset through
/proc/self/clear_refs before the load), with the size of the packed result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = """
import sys, json

def status(key):  # kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

from maverick_quant.bundle import Bundle
from maverick_quant.compress.kernels.layout import Int4Weight, concat_outputs
from maverick_quant.compress.types import concat_leading
from maverick_quant.runtime import _routed_experts
bundle = Bundle(sys.argv[1])
layer = 1
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
if sys.argv[2] == "stored":
    weights = _routed_experts(bundle, layer)
else:  # unpack every chunk, stack, pack again, concatenate gate and up
    parts = {}
    for _, chunk in bundle.expert_chunks(layer):
        for name, weight in chunk.items():
            parts.setdefault(name, []).append(weight)
    stacked = {name: Int4Weight.from_quantized(concat_leading(chunks)) for name, chunks in parts.items()}
    weights = {"gate_up": concat_outputs([stacked["gate_proj"], stacked["up_proj"]]), "down": stacked["down_proj"]}
after = status("VmHWM")
print(json.dumps({"added_mib": (after - before) / 1024, "result_mib": sum(w.nbytes() for w in weights.values()) / 2**20}))
"""


def build(work: Path, hidden: int, inter: int, experts: int) -> Path:
    """A random Llama4ForCausalLM (layer 1 MoE) saved in work/model, quantized to work/bundle."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    model_dir, bundle = work / "model", work / "bundle"
    if not (bundle / "manifest.json").is_file():
        config = Llama4TextConfig(hidden_size=hidden, intermediate_size=inter, intermediate_size_mlp=inter,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8,
                                  num_local_experts=experts, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                  vocab_size=1024, attention_chunk_size=64, use_qk_norm=True)
        torch.manual_seed(0)
        with torch.no_grad():
            model = Llama4ForCausalLM(config)
            for param in model.parameters():
                param.normal_(0.0, 0.02)
        model.save_pretrained(model_dir, max_shard_size="200MB")
        per_expert_mib = 3 * hidden * inter * 4 * 12 / 2**20  # experts.experts_per_chunk's budget per expert
        subprocess.run([sys.executable, "-m", "maverick_quant", "quantize", str(model_dir), "--method", "rtn",
                        "--group-size", "128", "--moe-chunk-mib", str(int(per_expert_mib * experts / 4) + 1),
                        "--out", str(bundle), "--no-progress", "--device", "cpu"], check=True)
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=16)
    args = parser.parse_args()
    bundle = build(args.work, args.hidden, args.inter, args.experts)
    chunks = len(json.loads((bundle / "manifest.json").read_text())["layers"][1]["experts"]["chunks"])
    print(f"{args.experts} experts of {args.hidden} x {args.inter} in {chunks} chunks, 4-bit g128\n")
    print("| path | peak RSS added (MiB) | packed result (MiB) |\n|---|---:|---:|")
    for path in ("stored", "unpack-repack"):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(bundle), path],
                             check=True, capture_output=True, text=True, cwd=REPO).stdout
        figures = json.loads(out.strip().splitlines()[-1])
        print(f"| {path} | {figures['added_mib']:.0f} | {figures['result_mib']:.0f} |")


if __name__ == "__main__":
    main()
