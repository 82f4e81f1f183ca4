"""Per-expert GPTQ and AWQ quality on a Llama 4 layout MoE that sees real text: SmolLM2 upcycled.

SmolLM2-135M becomes a Llama4ForCausalLM (maverick_quant.synthetic.upcycle_to_llama4):
MoE on layers 1, 5, ..., 29 with 8 routed experts (perturbed copies of the MLP, top-1,
random router: routing is uneven on real text) and the MLP as shared expert. Calibrates on
WikiText-2 validation, quantizes with RTN, with GPTQ under each `moe.policy`, with AWQ and
AWQ+GPTQ, and scores
every candidate against the float upcycled model on the first WikiText-2 test windows
(GPTQ-paper protocol). Prints a Markdown table.

With --expert-errors each candidate is scored by `validate`'s own evaluation instead, which
also measures every routed expert on the held-out tokens routed to it and the routing
agreement (docs/validation.md): extra columns, about twice the scoring time.

    python benchmarks/moe_quality.py --work /tmp/mq-moeq [--samples 32] [--windows 40] [--only "gptq routed" awq awq+gptq] [--expert-errors]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("smollm2_quality", HERE / "smollm2_quality.py")
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)

CONFIGS = {
    "rtn": ["--method", "rtn"],
    "gptq routed (fallback mixed < 128 tokens)": ["--moe-policy", "routed"],
    "gptq routed (fallback rtn < 128 tokens)": ["--moe-policy", "routed", "--moe-fallback", "rtn"],
    "gptq routed full-rank (fallback mixed < 128 tokens or < K)": ["--moe-policy", "routed", "--moe-require-full-rank"],
    "gptq mixed (mix 0.1)": ["--moe-policy", "mixed"],
    "awq (routed, fallback mixed)": ["--method", "awq"],
    "awq+gptq (routed, fallback mixed)": ["--method", "awq+gptq"],
    "awq+gptq clipped (routed, fallback mixed)": ["--method", "awq+gptq", "--awq-clip"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--only", nargs="*", help="config names (before the parenthesis) to run; rtn always runs")
    parser.add_argument("--expert-errors", action="store_true",
                        help="score with validate's evaluation: per-expert error and routing agreement columns")
    args = parser.parse_args()

    from maverick_quant.bundle import Bundle
    from maverick_quant.calibration.data import eval_windows, load_tokenizer
    from maverick_quant.sources import smollm2_hf_dir
    from maverick_quant.streaming import open_source
    from maverick_quant.synthetic import upcycle_to_llama4
    from maverick_quant.validation.evaluate import evaluate

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / "smollm2-llama4-8e"
    if not model_dir.exists():
        upcycle_to_llama4(smollm2_hf_dir(), model_dir, num_experts=8, moe_every=4)
    calib = args.work / f"calib-{args.samples}x{args.seq_len}"
    if not calib.exists():
        base.cli("calibrate", str(model_dir), "--data", str(base.DATA / "wiki.valid.tokens"), "--out", str(calib),
                 "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--coverage", "--no-progress")
    windows = eval_windows(base.DATA / "wiki.test.raw", load_tokenizer(model_dir), 512, args.windows)
    ref_model, ref_hidden = base.final_hidden(open_source(model_dir), windows)
    rows = {"float (upcycled)": {"ppl": base.score(ref_model, ref_hidden, ref_model, ref_hidden, windows)["reference"]["ppl"]}}
    for name, options in CONFIGS.items():
        if args.only and name != "rtn" and name.split(" (")[0] not in args.only:
            continue
        bundle_dir = args.work / name.split(" (")[0].replace(" ", "-")
        if "fallback rtn" in name:
            bundle_dir = bundle_dir.with_name(bundle_dir.name + "-rtnfallback")
        if not bundle_dir.exists():
            base.cli("quantize", str(model_dir), *base.calib_options(calib, options), "--out", str(bundle_dir),
                     "--no-progress", "--group-size", str(args.group_size), *options)
        bundle = Bundle(bundle_dir)
        if args.expert_errors:
            summary = evaluate(open_source(model_dir), bundle, windows, show_progress=False).summary
        else:
            cand_model, cand_hidden = base.final_hidden(bundle, windows)
            summary = base.score(ref_model, ref_hidden, cand_model, cand_hidden, windows)
        audit = [r for layer in bundle.manifest["layers"] for r in layer.get("experts", {}).get("audit", [])]
        rows[name] = {"ppl": summary["candidate"]["ppl"], "kl_mean": summary["kl"]["mean"], "top1": summary["top1_agreement"],
                      "fallbacks": sum("fallback" in r["reason"] or "fallback" in (r.get("awq_reason") or "")
                                       for r in audit), **bundle.manifest["summary"],
                      **_expert_columns(summary)}
        print(json.dumps({name: rows[name]}), flush=True)
    _print_table(rows, args.group_size, args.expert_errors)


def _expert_columns(summary: dict) -> dict:
    """Per-expert validation error (pooled, median, max) and the lowest routing agreement, when measured."""
    error = summary.get("experts", {}).get("rel_error")
    if not error:
        return {}
    return {"expert_pooled": error["pooled"], "expert_median": error["median"], "expert_max": error.get("max"),
            "routing_min": summary.get("routing", {}).get("agreement", {}).get("min")}


def _print_table(rows: dict, group_size: int, expert_errors: bool) -> None:
    ref, rtn = rows["float (upcycled)"]["ppl"], rows["rtn"]["ppl"]
    extra = " expert err pooled | median | max | routing agreement min |" if expert_errors else ""
    print(f"\n| config (4-bit g{group_size} sym) | ppl | vs float | RTN gap closed | KL mean | top-1 | fallbacks | "
          f"quantize s | peak RSS MiB |{extra}")
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * (4 if expert_errors else 0))
    for name, r in rows.items():
        closed = f"{(rtn - r['ppl']) / (rtn - ref):.0%}" if name.startswith(("gptq", "awq")) else ""
        line = (f"| {name} | {r['ppl']:.3f} | {r['ppl'] / ref - 1:+.2%} | {closed} | {r.get('kl_mean', 0):.4f} | "
                f"{r.get('top1', 1):.3f} | {r.get('fallbacks', '')} | {r.get('seconds', 0):.0f} | {r.get('peak_rss_mib', 0):.0f} |")
        if expert_errors:
            line += "".join(f" {r[key]:.4f} |" if r.get(key) is not None else " |"
                            for key in ("expert_pooled", "expert_median", "expert_max", "routing_min"))
        print(line)


if __name__ == "__main__":
    main()
