"""Runs in GPTQModel's own environment (not ours): load a GPTQ or AWQ export with a real
client and write its logits, so the tests can compare them with our dequantized bundle.

    python gptqmodel_logits.py EXPORT_DIR {gptqmodel|transformers} IDS.npy OUT.npy [BACKEND]

Prints one JSON line: the quantized-linear classes the client built and any plain Linear
left in the model besides lm_head and routers (a checkpoint the client misread can leave
uninitialised float layers behind, which a logits check alone might not name).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch


def load(export_dir: str, loader: str, backend: str) -> torch.nn.Module:
    if loader == "gptqmodel":
        from gptqmodel import GPTQModel

        return GPTQModel.load(export_dir, device="cpu", backend=backend, dtype=torch.float16).model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export_dir, device_map="cpu", dtype=torch.float16)


def main() -> None:
    export_dir, loader, ids_path, out_path = sys.argv[1:5]
    backend = sys.argv[5] if len(sys.argv) > 5 else "auto"
    model = load(export_dir, loader, backend).eval()
    quantized = sorted({type(m).__name__ for m in model.modules() if "QuantLinear" in type(m).__name__
                        or type(m).__name__.startswith(("Torch", "Awq"))})
    plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear
             and not name.endswith(("lm_head", "router")) and "vision" not in name and "projector" not in name]
    ids = torch.from_numpy(np.load(ids_path, allow_pickle=False))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float().numpy()
    np.save(out_path, logits, allow_pickle=False)
    print(json.dumps({"quantized_classes": quantized, "plain_linears": plain}))


if __name__ == "__main__":
    main()
