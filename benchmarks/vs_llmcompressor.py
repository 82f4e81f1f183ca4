"""maverick-quant against llm-compressor at 4-bit GPTQ and AWQ on SmolLM2-135M, same calibration tokens.

Calibrates once with `maverick-quant calibrate` (32 windows x 512 tokens of WikiText-2
validation, seed 0, by default) and feeds exactly those token ids to llm-compressor's
`oneshot` (a datasets.Dataset of input_ids / attention_mask, num_calibration_samples=S,
max_seq_length=L, no shuffling, CPU), which runs in its own virtual environment
(`--venv`, default ~/.cache/maverick-quant/llmcompressor-venv; this script runs itself there
with `--lc-worker`).

Configurations, group 64 for both (llm-compressor's W4A16 / W4A16_ASYM presets use group 128,
which does not divide SmolLM2's 576 input columns; llm-compressor 0.14.0.1 refuses it, "The
following layers have weight column counts not divisible by group_size", and with
bypass_divisibility_checks=True its observer fails, "unflatten: Provided sizes [-1, 128] don't
multiply up to the size of dim 1 (576)"; so the presets' weights are given at group 64 through
config_groups, everything else as the preset):

- GPTQ 4-bit symmetric group 64: llm-compressor's `GPTQModifier(targets="Linear", ignore=["lm_head"])`
  with W4A16's weights at group 64 and its defaults (dampening_frac 0.01, actorder "static" =
  "weight": static groups, trivial g_idx; block 128; min-max scales of the original weights),
  against ours with the same damping and act-order (`quantize --method gptq --sym --group-size 64
  --act-order --damp 0.01`) and ours at its defaults (damp 0.01, no act-order).
- AWQ 4-bit asymmetric group 64: llm-compressor's `AWQModifier()` at its defaults (duo scaling
  on, n_grid 20, no clipping; v_proj -> o_proj skipped where GQA shapes differ) +
  `QuantizationModifier` (W4A16_ASYM's min-max weights at group 64), ignore lm_head, against ours
  at its defaults (`--method awq --asym`: duo scaling off, clipping on, grid 20, 1,024 sampled
  tokens) and ours at llm-compressor's settings (`--awq-duo --no-awq-clip`). On a host without an
  accelerator llm-compressor's AWQ pins its cached activations and fails ("Cannot access
  accelerator device when none is available"): the worker turns that pinning into a no-op.
- RTN at each grid (ours), the floor of "RTN gap closed".

llm-compressor's input is the model folder itself (`sources.smollm2_hf_dir`, whose config.json
no longer carries the `quantization_config: {quant_method: gguf}` of the GGUF-to-HF conversion:
oneshot refused it as a model quantized already).

llm-compressor's result is saved in compressed-tensors format (pack-quantized). Every
candidate is scored with `maverick-quant validate` against the fp32 reference on the first
`--windows` non-overlapping 512-token windows of WikiText-2 raw test (GPTQ protocol). Where
`validate` refuses llm-compressor's folder, the refusal is recorded and the folder is
decompressed in the venv (transformers + compressed-tensors, run_compressed=False) into an
fp32 HF folder, checked against the compressed model's own logits, and that is validated.

Quantize wall time is the whole process (start, model load, calibration, save) timed from
here, plus the tool's own figure (ours: the manifest's seconds; llm-compressor: `oneshot`
alone); peak RSS is each quantize process's (ru_maxrss from wait4, `head_to_head.measured`; the
tool's own beside it: our manifest's, llm-compressor's worker's VmHWM). Prints a Markdown table;
--json writes figures.

    ~/.cache/maverick-quant/llmcompressor-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    python benchmarks/vs_llmcompressor.py --work /tmp/mq-vs-lc --json /tmp/mq-vs-lc/figures.json
    python benchmarks/vs_llmcompressor.py --work /tmp/mq-vs-lc \\
        --only rtn-w4-g64-sym gptq-w4-g64-sym-actorder llmc-gptq-w4-g64-sym    # GPTQ only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from head_to_head import DATA, cached_cost, calibrate_once, figures_of, measured, quantize_ours, validate

LC_ENV = {"CUDA_VISIBLE_DEVICES": ""}
DEFAULT_VENV = Path.home() / ".cache" / "maverick-quant" / "llmcompressor-venv"


def configs(gptq_group: int, awq_group: int) -> dict[str, dict]:
    """name: {"tool": "ours"|"llmc", "grid": the RTN row it is measured against, and its options}."""
    gg, ag = str(gptq_group), str(awq_group)
    gptq_grid, awq_grid = f"w4-g{gg}-sym", f"w4-g{ag}-asym"
    return {
        f"rtn-{gptq_grid}": {"tool": "ours", "grid": gptq_grid,
                             "options": ["--method", "rtn", "--bits", "4", "--group-size", gg, "--sym"]},
        f"gptq-{gptq_grid}-actorder": {"tool": "ours", "grid": gptq_grid,
                                       "options": ["--method", "gptq", "--bits", "4", "--group-size", gg, "--sym",
                                                   "--act-order", "--damp", "0.01"]},
        # llm-compressor's order of work: each layer's statistics in one pass, before any of its linears is quantized
        f"gptq-{gptq_grid}-actorder-one-pass": {"tool": "ours", "grid": gptq_grid,
                                                "options": ["--method", "gptq", "--bits", "4", "--group-size", gg,
                                                            "--sym", "--act-order", "--damp", "0.01",
                                                            "--no-true-sequential"]},
        f"gptq-{gptq_grid}": {"tool": "ours", "grid": gptq_grid,
                              "options": ["--method", "gptq", "--bits", "4", "--group-size", gg, "--sym"]},
        f"llmc-gptq-{gptq_grid}": {"tool": "llmc", "grid": gptq_grid, "method": "gptq", "group_size": gptq_group,
                                   "symmetric": True},
        f"rtn-{awq_grid}": {"tool": "ours", "grid": awq_grid,
                            "options": ["--method", "rtn", "--bits", "4", "--group-size", ag, "--asym"]},
        f"awq-{awq_grid}": {"tool": "ours", "grid": awq_grid,
                            "options": ["--method", "awq", "--bits", "4", "--group-size", ag, "--asym"]},
        f"awq-{awq_grid}-duo-noclip": {"tool": "ours", "grid": awq_grid,
                                       "options": ["--method", "awq", "--bits", "4", "--group-size", ag, "--asym",
                                                   "--awq-duo", "--no-awq-clip"]},
        f"llmc-awq-{awq_grid}": {"tool": "llmc", "grid": awq_grid, "method": "awq", "group_size": awq_group,
                                 "symmetric": False},
    }


# ---------------------------------------------------------------------------------------------
# llm-compressor side: runs in its own venv (no maverick_quant there)
# ---------------------------------------------------------------------------------------------

def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lc_worker(spec_path: str) -> None:
    """Quantize with llm-compressor's oneshot as `spec` says; write spec["result"] (JSON)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot

    spec = json.loads(Path(spec_path).read_text())
    patches = []
    if not torch.accelerator.is_available():
        # llm-compressor 0.14.0.1's AWQ pins its cached activations unconditionally
        # (AWQModifier._apply_smoothing -> IntermediatesCache.pin_memory), which raises
        # "RuntimeError: Cannot access accelerator device when none is available" on a CPU-only
        # host. Pinning only speeds host-to-device copies: skip it, nothing else changes.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
        patches.append("IntermediatesCache.pin_memory -> no-op (no accelerator)")
    torch.manual_seed(0)
    ids = torch.load(spec["tokens"])
    samples, seq_len = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    preset = "W4A16" if spec["symmetric"] else "W4A16_ASYM"  # group 128
    if spec["group_size"] == 128:
        scheme = {"targets": ["Linear"], "scheme": preset}
    else:  # the preset's weights at another group size
        weights = {"num_bits": 4, "type": "int", "symmetric": spec["symmetric"], "strategy": "group",
                   "group_size": spec["group_size"], "dynamic": False}
        scheme = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    if spec["method"] == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = [GPTQModifier(**scheme, ignore=["lm_head"])]
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(), QuantizationModifier(**scheme, ignore=["lm_head"])]
    settings = {type(m).__name__: m.model_dump(exclude={"config_groups"}, mode="json", exclude_none=True)
                for m in recipe}
    started = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=samples,
            max_seq_length=seq_len, shuffle_calibration_samples=False, pipeline=spec.get("pipeline", "sequential"))
    oneshot_seconds = time.perf_counter() - started
    model.save_pretrained(spec["out"], save_compressed=True)
    tokenizer.save_pretrained(spec["out"])
    versions = {name: __import__(name).__version__ for name in ("torch", "transformers", "compressed_tensors")}
    versions["llmcompressor"] = llmcompressor.__version__
    Path(spec["result"]).write_text(json.dumps({
        "oneshot_seconds": oneshot_seconds, "peak_rss_mib": vm_hwm_mib(), "versions": versions,
        "settings": settings, "patches": patches,
        "quantization_config": json.loads((Path(spec["out"]) / "config.json").read_text()).get("quantization_config"),
    }, indent=2, default=str))


def lc_decompress(spec_path: str) -> None:
    """Load llm-compressor's compressed folder with transformers + compressed-tensors, decompress
    it to float, save an fp32 HF folder without a quantization config, and check the saved model's
    logits against the compressed model's (run_compressed) on the first tokens of the text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    spec = json.loads(Path(spec_path).read_text())
    source, out = Path(spec["source"]), Path(spec["out"])
    decompressed = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    config = decompressed.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(decompressed.config).from_dict(config), dtype=torch.float32)
    state = {k: v for k, v in decompressed.state_dict().items()
             if not any(k.endswith(s) for s in ("_scale", "_zero_point", "_g_idx", "_shape", "_packed"))}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not plain.config.tie_word_embeddings]
    assert not missing and not unexpected, (missing, unexpected)
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(Path(spec["text"]).read_text()[:4000], return_tensors="pt").input_ids[:, :64]
    compressed = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)  # run_compressed default
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        a, b = compressed(ids).logits.float(), reloaded(ids).logits.float()
    linear = next(m for m in compressed.modules() if "Linear" in type(m).__name__ and "lm_head" not in str(m))
    Path(spec["result"]).write_text(json.dumps({
        "tokens_checked": ids.shape[1], "max_abs_logit_diff": (a - b).abs().max().item(),
        "max_abs_logit": a.abs().max().item(), "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "compressed_linear_class": type(linear).__name__,
    }, indent=2))


# ---------------------------------------------------------------------------------------------
# orchestration: our environment
# ---------------------------------------------------------------------------------------------

def quantize_llmc(python: Path, model_dir: Path, tokens: Path, out: Path, spec: dict) -> dict:
    result, spec_path = out.with_name(out.name + ".result.json"), out.with_name(out.name + ".spec.json")
    spec_path.write_text(json.dumps({**spec, "model": str(model_dir), "tokens": str(tokens), "out": str(out),
                                     "result": str(result)}))
    cost = cached_cost(out, [str(python), __file__, "--lc-worker", str(spec_path)], env={**os.environ, **LC_ENV})
    figures = json.loads(result.read_text())
    return {**cost, "tool_seconds": figures["oneshot_seconds"], "tool_peak_rss_mib": figures["peak_rss_mib"],
            "llmc": figures}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("--lc-worker", "--lc-decompress"):
        return (lc_worker if sys.argv[1] == "--lc-worker" else lc_decompress)(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--gptq-group-size", type=int, default=64,
                        help="GPTQ grid (symmetric); 128, W4A16's, does not divide SmolLM2's 576 columns")
    parser.add_argument("--awq-group-size", type=int, default=64,
                        help="AWQ grid (asymmetric); 128, W4A16_ASYM's, does not divide SmolLM2's 576 columns")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="llm-compressor's virtual environment")
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from maverick_quant.calibration.data import CalibrationSet
    from maverick_quant.sources import smollm2_hf_dir

    model_dir = smollm2_hf_dir()
    python = args.venv / "bin" / "python"
    args.work.mkdir(parents=True, exist_ok=True)
    calib = calibrate_once(model_dir, args.work, args.samples, args.seq_len)
    tokens = args.work / f"calib-{args.samples}x{args.seq_len}.input_ids.pt"
    ids = CalibrationSet.load(calib).input_ids
    assert tuple(ids.shape) == (args.samples, args.seq_len), ids.shape
    torch.save(ids.clone(), tokens)

    rows: dict[str, dict] = {}
    for name, config in configs(args.gptq_group_size, args.awq_group_size).items():
        if args.only and name not in args.only:
            continue
        out = args.work / name
        row = {"tool": config["tool"], "grid": config["grid"]}
        if config["tool"] == "ours":
            row |= {"options": config["options"], **quantize_ours(model_dir, calib, out, config["options"])}
        else:
            row |= quantize_llmc(python, model_dir, tokens, out, {k: v for k, v in config.items()
                                                                    if k not in ("tool", "grid")})
        report, refusal = validate(model_dir, out, args.work / f"{name}.report", args.windows)
        if report is None and config["tool"] == "llmc":
            row["validate_refused"] = refusal
            print(f"{name}: validate refused the compressed-tensors folder:\n{refusal}", flush=True)
            fp32 = args.work / f"{name}-decompressed-fp32"
            check = fp32.with_name(fp32.name + ".check.json")
            if not check.exists():
                spec = fp32.with_name(fp32.name + ".spec.json")
                spec.write_text(json.dumps({"source": str(out), "out": str(fp32), "result": str(check),
                                            "text": str(DATA / "wiki.test.raw")}))
                measured([str(python), __file__, "--lc-decompress", str(spec)], fp32.with_name(fp32.name + ".log"),
                         env={**os.environ, **LC_ENV})
            row["decompress_check"] = json.loads(check.read_text())
            report, refusal = validate(model_dir, fp32, args.work / f"{name}-decompressed.report", args.windows)
            row["validated"] = str(fp32)
        if report is None:
            row["validate_error"] = refusal
            print(f"{name}: validate failed:\n{refusal}", flush=True)
        else:
            row |= figures_of(report)
        rows[name] = row
        print(json.dumps({name: {k: v for k, v in row.items() if k != "llmc"}}), flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


def print_table(rows: dict) -> None:
    scored = {name: r for name, r in rows.items() if "ppl" in r}
    if not scored:
        return
    ref = next(iter(scored.values()))["ref_ppl"]
    rtn = {r["grid"]: r["ppl"] for name, r in scored.items() if name.startswith("rtn-")}
    print(f"\nfp32 reference perplexity: {ref:.3f}\n")
    print("| config | tool | ppl | ppl ratio | RTN gap closed | KL mean | top-1 | quantize wall s | tool s | "
          "peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in scored.items():
        closed = ""
        if r["grid"] in rtn and not name.startswith("rtn-"):
            closed = f"{(rtn[r['grid']] - r['ppl']) / (rtn[r['grid']] - ref):.0%}"
        tool = "llm-compressor" if r["tool"] == "llmc" else "maverick-quant"
        print(f"| {name} | {tool} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | {closed} | {r['kl_mean']:.4f} | "
              f"{r['top1']:.3f} | {r['wall_seconds']:.0f} | {r['tool_seconds'] or 0:.0f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
