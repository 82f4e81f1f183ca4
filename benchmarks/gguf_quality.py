"""SmolLM2 in llama.cpp: our calibrated GGUF against the plain GGUF of the same type.

1. Calibrates on WikiText-2 validation (`--samples` x 512 tokens) unless already done.
2. Quantizes with GPTQ on exactly the type's grid (`quantize --gguf-grid TYPE`) and exports
   the bundle losslessly (`export --format gguf`).
3. Exports the float model as a plain GGUF: every linear rounded to nearest by gguf-py
   (`export FLOAT_MODEL --format gguf`), the same type; embeddings and output stay in float
   in both files (llama-quantize would also quantize those), so only the linears differ.
   gguf-py cannot quantize Q4_K: there the plain file is our min/max RTN on its grid, and a
   third file is llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize`
   runs, pure type, no imatrix, embeddings kept F32) applied to an F32 GGUF of the float model.
   Where K is not a multiple of 256 llama.cpp falls back to Q5_0 and we to Q4_1: the file
   sizes are printed beside the perplexities.
4. Runs both files in llama.cpp (llama-cpp-python) and scores the first `--windows` windows
   of 512 tokens of WikiText-2 raw test under both protocols (GPTQ paper: every token;
   llama.cpp: BOS first, second half scored). The bundle is also scored through our own
   streamed path, so the two engines' perplexities for the same weights can be compared.

    python benchmarks/gguf_quality.py --work /tmp/mq-gguf [--samples 128] [--windows 40] [--type Q4_0|Q4_1|Q4_K|Q8_0]
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


def llama_cpp_quantize(float_gguf: Path, out: Path, gguf_type: str) -> None:
    """llama.cpp's own quantizer (llama-quantize's library call): every linear in `gguf_type`
    (pure: no per-tensor mix), token embeddings and output head kept F32, no imatrix."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}_S" if gguf_type.endswith("_K")
                           else f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    params.pure, params.nthread = True, 2
    params.token_embedding_type = params.output_tensor_type = 0  # GGML_TYPE_F32
    tmp = out.with_name(out.name + ".partial")
    if llama_cpp.llama_model_quantize(str(float_gguf).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {float_gguf}")
    tmp.rename(out)


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
    parser.add_argument("--clip-search", action="store_true", help="quantize with --clip-search")
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
    name = f"{args.method}-{args.type}" + ("-clip" if args.clip_search else "")
    bundle = args.work / name
    if not bundle.exists():
        method = ["--method", args.method]
        base.cli("quantize", str(model_dir), *base.calib_options(calib, method), "--out", str(bundle), *method,
                 "--gguf-grid", args.type, "--no-progress", *(["--clip-search"] if args.clip_search else []))
    ours, plain = args.work / f"{name}.gguf", args.work / f"plain-{args.type}.gguf"
    if not ours.exists():
        base.cli("export", str(bundle), "--format", "gguf", "--gguf-type", args.type, "--out", str(ours))
    if not plain.exists():
        base.cli("export", str(model_dir), "--format", "gguf", "--gguf-type", args.type, "--out", str(plain))
    llama_quantized = args.work / f"llama-quantize-{args.type}.gguf"
    if not llama_quantized.exists():
        float_gguf = args.work / "float-F32.gguf"
        if not float_gguf.exists():
            base.cli("export", str(model_dir), "--format", "gguf", "--gguf-type", "F32", "--out", str(float_gguf))
        llama_cpp_quantize(float_gguf, llama_quantized, args.type)
    plain_name = "our RTN on its grid" if args.type == "Q4_K" else "gguf-py RTN"
    files = {f"plain {args.type} GGUF ({plain_name}) in llama.cpp": plain,
             f"llama.cpp's own {args.type} (llama_model_quantize, pure) in llama.cpp": llama_quantized,
             f"{args.method} {args.type} GGUF in llama.cpp": ours}

    tokenizer = load_tokenizer(model_dir)
    rows = {}
    for protocol in ("gptq", "llama.cpp"):
        windows = eval_windows(base.DATA / "wiki.test.raw", tokenizer, 512, args.windows, protocol)
        first = scored_from(protocol, 512)
        started = time.perf_counter()
        rows[protocol] = {"float (ours)": streamed_ppl(open_source(model_dir), windows, first),
                          **{name: llama_cpp_ppl(path, windows, first) for name, path in files.items()},
                          f"{args.method} {args.type} bundle (ours)": streamed_ppl(Bundle(bundle), windows, first),
                          "seconds": time.perf_counter() - started}
        print(json.dumps({protocol: rows[protocol]}), flush=True)
    print("\n| candidate | file MiB | ppl, GPTQ protocol | ppl, llama.cpp protocol |\n|---|---|---|---|")
    for name in rows["gptq"]:
        if name != "seconds":
            size = f"{files[name].stat().st_size / 2**20:.1f}" if name in files else ""
            print(f"| {name} | {size} | {rows['gptq'][name]:.3f} | {rows['llama.cpp'][name]:.3f} |")


if __name__ == "__main__":
    main()
