"""SmolLM2 in llama.cpp: our calibrated GGUF against the plain GGUF of the same type.

1. Calibrates on WikiText-2 validation (`--samples` x 512 tokens) unless already done.
2. Quantizes with GPTQ on exactly the type's grid (`quantize --gguf-grid TYPE`) and exports
   the bundle losslessly (`export --format gguf`).
3. Exports the float model as a plain GGUF: every linear rounded to nearest by gguf-py
   (`export FLOAT_MODEL --format gguf`), the same type; embeddings and output stay in float
   in both files (llama-quantize would also quantize those), so only the linears differ.
4. Runs both files in llama.cpp (llama-cpp-python) and scores the first `--windows` windows
   of 512 tokens of WikiText-2 raw test under both protocols (GPTQ paper: every token;
   llama.cpp: BOS first, second half scored). The bundle is also scored through our own
   streamed path, so the two engines' perplexities for the same weights can be compared.

    python benchmarks/gguf_quality.py --work /tmp/mq-gguf [--samples 128] [--windows 40] [--type Q4_0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("smollm2_quality", HERE / "smollm2_quality.py")
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)


def llama_cpp_ppl(gguf_path: Path, windows: torch.Tensor, first_scored: int) -> float:
    """Perplexity llama.cpp gives windows [W, L], scoring tokens first_scored .. L-1 of each."""
    from maverick_quant.validation.evaluate import GGUFCandidate

    model = GGUFCandidate(gguf_path)
    nll, count = 0.0, 0
    for window in windows.tolist():
        logits = model.window_logits(window).double()
        log_probs = logits[first_scored - 1 : -1].log_softmax(-1)
        targets = torch.tensor(window[first_scored:])
        nll -= float(log_probs.gather(1, targets[:, None]).sum())
        count += targets.numel()
    return math.exp(nll / count)


def streamed_ppl(source, windows: torch.Tensor, first_scored: int) -> float:
    """Perplexity of a WeightSource (bundle or float model) through our streamed path,
    scoring the same tokens as `llama_cpp_ppl`."""
    model, hidden = base.final_hidden(source, windows)
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], 2):
        logits = model.logits(hidden[start : start + 2, first_scored - 1 : -1]).double()
        targets = windows[start : start + 2, first_scored:]
        nll -= float(logits.log_softmax(-1).gather(-1, targets[..., None]).sum())
        count += targets.numel()
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--type", default="Q4_0")
    parser.add_argument("--method", default="gptq")
    args = parser.parse_args()

    from maverick_quant.bundle import Bundle
    from maverick_quant.calibration.data import eval_windows, load_tokenizer, scored_from
    from maverick_quant.sources import smollm2_hf_dir
    from maverick_quant.streaming import open_source

    model_dir = smollm2_hf_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    calib = args.work / f"calib-{args.samples}x512"
    if not calib.exists():
        base.cli("calibrate", str(model_dir), "--data", str(base.DATA / "wiki.valid.tokens"), "--out", str(calib),
                 "--samples", str(args.samples), "--seq-len", "512")
    bundle = args.work / f"{args.method}-{args.type}"
    if not bundle.exists():
        base.cli("quantize", str(model_dir), "--calib", str(calib), "--out", str(bundle), "--method", args.method,
                 "--gguf-grid", args.type, "--no-progress")
    ours, plain = args.work / f"{args.method}-{args.type}.gguf", args.work / f"plain-{args.type}.gguf"
    if not ours.exists():
        base.cli("export", str(bundle), "--format", "gguf", "--gguf-type", args.type, "--out", str(ours))
    if not plain.exists():
        base.cli("export", str(model_dir), "--format", "gguf", "--gguf-type", args.type, "--out", str(plain))

    tokenizer = load_tokenizer(model_dir)
    rows = {}
    for protocol in ("gptq", "llama.cpp"):
        windows = eval_windows(base.DATA / "wiki.test.raw", tokenizer, 512, args.windows, protocol)
        first = scored_from(protocol, 512)
        started = time.perf_counter()
        rows[protocol] = {
            "float (ours)": streamed_ppl(open_source(model_dir), windows, first),
            f"plain {args.type} GGUF (gguf-py RTN) in llama.cpp": llama_cpp_ppl(plain, windows, first),
            f"{args.method} {args.type} GGUF in llama.cpp": llama_cpp_ppl(ours, windows, first),
            f"{args.method} {args.type} bundle (ours)": streamed_ppl(Bundle(bundle), windows, first),
            "seconds": time.perf_counter() - started,
        }
        print(json.dumps({protocol: rows[protocol]}), flush=True)
    print("\n| candidate | ppl, GPTQ protocol | ppl, llama.cpp protocol |\n|---|---|---|")
    for name in rows["gptq"]:
        if name != "seconds":
            print(f"| {name} | {rows['gptq'][name]:.3f} | {rows['llama.cpp'][name]:.3f} |")


if __name__ == "__main__":
    main()
