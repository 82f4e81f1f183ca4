"""SmolLM2-135M quality and cost table: reference vs RTN vs GPTQ vs AWQ at several settings.

Calibrates once on WikiText-2 validation (128 windows x 512 tokens by default), quantizes
each configuration through the CLI in its own process (wall time and peak RSS from the
bundle manifest), then scores every candidate and the fp32 reference on the first 40
non-overlapping 512-token windows of WikiText-2 raw test (GPTQ-paper protocol). The
reference's final hidden states are computed once and candidates are scored one by one,
so the table costs one forward per model. Prints a Markdown table; --json writes figures.

    python benchmarks/smollm2_quality.py --work /tmp/mq-bench [--samples 128] [--only gptq-w4-g128-sym]
    python benchmarks/smollm2_quality.py --work /tmp/mq-awq --samples 32 \
        --only rtn-w4-g64-asym awq-w4-g64-asym awq+gptq-w4-g64-asym   # llm-compressor's AWQ settings
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"

CONFIGS = {  # name: quantize CLI options
    "rtn-w4-g128-sym": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym"],
    "gptq-w4-g128-sym": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym"],
    "rtn-w4-g128-sym-signed": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym", "--signed-scale"],
    "gptq-w4-g128-sym-signed": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym", "--signed-scale"],
    "rtn-w4-g128-sym-clip": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym", "--clip-search"],
    "gptq-w4-g128-sym-clip": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym", "--clip-search"],
    "rtn-w4-g128-sym-signed-clip": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym", "--signed-scale",
                                    "--clip-search"],
    "gptq-w4-g128-sym-signed-clip": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym", "--signed-scale",
                                     "--clip-search"],
    "rtn-w4-g128-asym-clip": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--asym", "--clip-search"],
    "gptq-w4-g128-asym-clip": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--asym", "--clip-search"],
    "rtn-w4-g128-asym": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--asym"],
    "gptq-w4-g128-asym": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--asym"],
    "rtn-w4-g64-sym": ["--method", "rtn", "--bits", "4", "--group-size", "64", "--sym"],
    "gptq-w4-g64-sym": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym"],
    "rtn-w4-g64-asym": ["--method", "rtn", "--bits", "4", "--group-size", "64", "--asym"],
    "gptq-w4-g64-asym": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--asym"],
    "rtn-w8-g128-sym": ["--method", "rtn", "--bits", "8", "--group-size", "128", "--sym"],
    "gptq-w8-g128-sym": ["--method", "gptq", "--bits", "8", "--group-size", "128", "--sym"],
    "rtn-w4-g32-asym (Q4_1 grid of the source file)": ["--method", "rtn", "--bits", "4", "--group-size", "32", "--asym"],
    "awq-w4-g64-asym": ["--method", "awq", "--bits", "4", "--group-size", "64", "--asym"],
    "awq-w4-g64-asym-duo": ["--method", "awq", "--bits", "4", "--group-size", "64", "--asym", "--awq-duo"],
    "awq+gptq-w4-g64-asym": ["--method", "awq+gptq", "--bits", "4", "--group-size", "64", "--asym"],
    "awq+gptq-w4-g64-asym-clip": ["--method", "awq+gptq", "--bits", "4", "--group-size", "64", "--asym", "--awq-clip"],
    "awq-w4-g128-sym": ["--method", "awq", "--bits", "4", "--group-size", "128", "--sym"],
    "awq+gptq-w4-g128-sym": ["--method", "awq+gptq", "--bits", "4", "--group-size", "128", "--sym"],
}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "maverick_quant", *args], check=True)


def calib_options(calib: Path, options: list[str]) -> list[str]:
    """`--calib DIR` for a method that reads calibration data (quantize refuses it beside rtn)."""
    rtn = "--method" in options and options[options.index("--method") + 1] == "rtn"
    return [] if rtn else ["--calib", str(calib)]


def full_model_baseline_rss(model_dir: Path, calib: Path) -> float:
    """Peak RSS (MiB) of a separate process that does what a whole-model tool does: load the
    fp32 model with transformers, make every weight resident (a model in use touches every
    page; lazily mapped weights would otherwise not count), and run the calibration windows
    through it, keeping the last hidden states of all of them [S, L, D]."""
    out = subprocess.run([sys.executable, __file__, "--baseline-process", str(model_dir), str(calib)],
                         check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


@torch.no_grad()
def baseline_process(model_dir: str, calib: str, batch: int = 8) -> None:
    from transformers import AutoModelForCausalLM

    from maverick_quant.host_memory import peak_rss_mib

    from maverick_quant.calibration.data import CalibrationSet

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
    ids = CalibrationSet.load(Path(calib)).input_ids
    hidden = torch.empty(*ids.shape, model.config.hidden_size)
    for start in range(0, ids.shape[0], batch):
        hidden[start : start + batch] = model.model(ids[start : start + batch]).last_hidden_state
    print(peak_rss_mib())


@torch.no_grad()
def final_hidden(source, windows: torch.Tensor, batch: int = 4):
    from maverick_quant.streaming import StreamingModel

    model = StreamingModel(source, batch=batch)
    return model, model_forward_hidden(model, windows)


def model_forward_hidden(model, windows):
    hidden = model.embed(windows)
    for index in range(model.num_layers):
        model.run_layer(model.layer(index), hidden, out=hidden)
    return hidden


@torch.no_grad()
def score(ref_model, ref_hidden, cand_model, cand_hidden, windows) -> dict:
    from maverick_quant.validation.metrics import MetricAccumulator

    metrics = MetricAccumulator()
    for start in range(0, windows.shape[0], 2):
        span = slice(start, start + 2)
        ref_logits, cand_logits = ref_model.logits(ref_hidden[span, :-1]), cand_model.logits(cand_hidden[span, :-1])
        vocab = ref_logits.shape[-1]
        metrics.update(ref_logits.reshape(-1, vocab), cand_logits.reshape(-1, vocab), windows[span, 1:].reshape(-1))
    return metrics.summary()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--baseline-process":
        return baseline_process(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from maverick_quant.bundle import Bundle
    from maverick_quant.calibration.data import eval_windows, load_tokenizer
    from maverick_quant.sources import smollm2_hf_dir
    from maverick_quant.streaming import open_source

    model_dir = smollm2_hf_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    calib = args.work / f"calib-{args.samples}x{args.seq_len}"
    if not calib.exists():
        cli("calibrate", str(model_dir), "--data", str(DATA / "wiki.valid.tokens"), "--out", str(calib),
            "--samples", str(args.samples), "--seq-len", str(args.seq_len))
    windows = eval_windows(DATA / "wiki.test.raw", load_tokenizer(model_dir), 512, args.windows)
    started = time.perf_counter()
    ref_model, ref_hidden = final_hidden(open_source(model_dir), windows)
    rows = {"reference (fp32)": {"ppl": score(ref_model, ref_hidden, ref_model, ref_hidden, windows)["reference"]["ppl"],
                                 "eval_seconds": time.perf_counter() - started}}
    print(json.dumps(rows), flush=True)
    for name, options in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        bundle_dir = args.work / name.split(" ")[0]
        if not bundle_dir.exists():
            cli("quantize", str(model_dir), *calib_options(calib, options), "--out", str(bundle_dir), "--no-progress",
                *options)
        bundle = Bundle(bundle_dir)
        cand_model, cand_hidden = final_hidden(bundle, windows)
        summary = score(ref_model, ref_hidden, cand_model, cand_hidden, windows)
        rows[name] = {"ppl": summary["candidate"]["ppl"], "kl_mean": summary["kl"]["mean"],
                      "top1": summary["top1_agreement"], **bundle.manifest["summary"]}
        print(json.dumps({name: rows[name]}), flush=True)
    rows["_baseline_full_model_peak_rss_mib"] = full_model_baseline_rss(model_dir, calib)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def print_table(rows: dict) -> None:
    ref = rows["reference (fp32)"]["ppl"]
    rtn = {name.split(" ")[0].split("-", 1)[1]: r["ppl"] for name, r in rows.items() if name.startswith("rtn")}
    print("\n| config | ppl | vs fp32 | RTN gap closed | KL mean | top-1 | quantize s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if name.startswith("_"):
            continue
        closed, grid = "", name.split(" ")[0].split("-", 1)[-1].removesuffix("-duo")
        if grid in rtn and not name.startswith("rtn"):
            closed = f"{(rtn[grid] - r['ppl']) / (rtn[grid] - ref):.0%}"
        print(f"| {name} | {r['ppl']:.3f} | {r['ppl'] / ref - 1:+.2%} | {closed} | {r.get('kl_mean', 0):.4f} | "
              f"{r.get('top1', 1):.3f} | {r.get('seconds', 0):.0f} | {r.get('peak_rss_mib', 0):.0f} |")
    print(f"\nwhole fp32 model + calibration activations, loaded by transformers: "
          f"peak RSS {rows['_baseline_full_model_peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
