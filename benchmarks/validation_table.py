"""What `validate` reports for SmolLM2's float model, its GPTQ 4-bit bundle and the Q4_0 GGUF of
that bundle (run in llama.cpp), on the same windows and HellaSwag tasks, with wall times.

The bundle is GPTQ on llama.cpp's Q4_0 grid (`quantize --gguf-grid Q4_0`), so the GGUF holds
exactly the bundle's weights: the two rows differ only in the engine that runs them (ours, in
fp32; llama.cpp, with activations rounded to 8 bits in its Q4_0 x Q8_0 dot products).

    python benchmarks/validation_table.py --work /tmp/mq-bench [--tasks 1000] [--windows 40] [--hellaswag-only]

`--work` must hold `gptq-Q4_0/` and `gptq-Q4_0.gguf` (made by benchmarks/gguf_quality.py
with the same --work).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("smollm2_quality", HERE / "smollm2_quality.py")
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)
HELLASWAG = base.DATA.parent / "hellaswag" / "hellaswag_val_full.txt"


def hellaswag_correct(models: dict, tasks: list, tokenizer) -> tuple[dict, dict]:
    """{model name: bool [tasks] (right answer chosen)} and {model name: seconds}."""
    from maverick_quant.validation.hellaswag import choose_answers, encode_task

    encoded = [encode_task(task, tokenizer) for task in tasks]
    labels = torch.tensor([task.label for task in tasks])
    correct, seconds = {}, {}
    for name, model in models.items():
        started = time.perf_counter()
        correct[name] = choose_answers(model, encoded, tokenizer.eos_token_id or 0) == labels
        seconds[name] = time.perf_counter() - started
        print(f"hellaswag {name}: {len(tasks)} tasks, {100 * correct[name].double().mean().item():.2f}% "
              f"in {seconds[name]:.0f} s", flush=True)
    return correct, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--hellaswag-only", action="store_true", help="skip the perplexity passes")
    args = parser.parse_args()

    from maverick_quant.bundle import Bundle
    from maverick_quant.calibration.data import eval_windows, load_tokenizer, scored_from
    from maverick_quant.sources import smollm2_hf_dir
    from maverick_quant.streaming import open_source
    from maverick_quant.validation.evaluate import GGUFCandidate, evaluate, evaluate_gguf
    from maverick_quant.validation.hellaswag import accuracy_drift, read_hellaswag

    model_dir = smollm2_hf_dir()
    tokenizer = load_tokenizer(model_dir)
    float_model, bundle = open_source(model_dir), Bundle(args.work / "gptq-Q4_0")
    gguf = GGUFCandidate(args.work / "gptq-Q4_0.gguf")
    rows = {"float": {}, "GPTQ bundle (ours)": {}, "Q4_0 GGUF (llama.cpp)": {}}
    for protocol in () if args.hellaswag_only else ("gptq", "llama.cpp"):
        windows = eval_windows(base.DATA / "wiki.test.raw", tokenizer, 512, args.windows, protocol)
        first = scored_from(protocol, 512)
        for name, candidate, run in (("GPTQ bundle (ours)", bundle, evaluate), ("Q4_0 GGUF (llama.cpp)", gguf, evaluate_gguf)):
            summary = run(float_model, candidate, windows, show_progress=False, first_scored=first).summary
            rows["float"][f"ppl {protocol}"] = summary["reference"]["ppl"]
            rows[name].update({f"ppl {protocol}": summary["candidate"]["ppl"], f"kl {protocol}": summary["kl"]["mean"],
                               f"top1 {protocol}": summary["top1_agreement"], f"seconds {protocol}": summary["seconds"]})
            print(json.dumps({protocol: {name: rows[name]}}), flush=True)

    tasks = read_hellaswag(HELLASWAG, args.tasks)
    correct, seconds = hellaswag_correct({"float": float_model, "GPTQ bundle (ours)": bundle,
                                          "Q4_0 GGUF (llama.cpp)": gguf}, tasks, tokenizer)
    for name in rows:
        drift = accuracy_drift(correct["float"], correct[name])
        rows[name].update({"hellaswag": drift["candidate"]["acc"], "hellaswag ci95": drift["candidate"]["ci95"],
                           "delta": drift["delta"], "delta ci95": drift["delta_ci95"], "hellaswag s": seconds[name]})
    print(json.dumps(rows), flush=True)
    if args.hellaswag_only:
        print(f"\n| model | HellaSwag acc ({len(tasks)} tasks) | vs float | wall time |\n|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['hellaswag']:.1f} ± {r['hellaswag ci95']:.1f} | {r['delta']:+.1f} ± {r['delta ci95']:.1f} pp "
                  f"| {r['hellaswag s']:.0f} s |")
        return

    print(f"\n| model | ppl (GPTQ protocol) | ppl (llama.cpp protocol) | KL mean | top-1 | HellaSwag acc ({len(tasks)} tasks) "
          "| vs float | wall time: ppl both protocols / HellaSwag |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ppl_s = r.get("seconds gptq", 0) + r.get("seconds llama.cpp", 0)
        kl = f"{r['kl gptq']:.4f}" if "kl gptq" in r else "—"
        top1 = f"{r['top1 gptq']:.3f}" if "top1 gptq" in r else "—"
        print(f"| {name} | {r['ppl gptq']:.3f} | {r['ppl llama.cpp']:.3f} | {kl} | {top1} | "
              f"{r['hellaswag']:.1f} ± {r['hellaswag ci95']:.1f} | {r['delta']:+.1f} ± {r['delta ci95']:.1f} pp | "
              f"{ppl_s:.0f} s / {r['hellaswag s']:.0f} s |")
    ours, theirs = rows["GPTQ bundle (ours)"]["ppl llama.cpp"], rows["Q4_0 GGUF (llama.cpp)"]["ppl llama.cpp"]
    print(f"\nllama.cpp-protocol perplexity of the same weights: llama.cpp {theirs:.3f}, ours {ours:.3f} "
          f"({theirs / ours - 1:+.2%})")


if __name__ == "__main__":
    main()
