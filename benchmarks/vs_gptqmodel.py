"""maverick-quant against GPTQModel 7.6.0 at 4-bit GPTQ (symmetric, group 128) on SmolLM2-135M, same tokens.

Calibrates once with `maverick-quant calibrate` (32 windows x 512 tokens of WikiText-2
validation, seed 0, by default) and feeds exactly those token ids to GPTQModel's
`quantize` (a list of {"input_ids", "attention_mask"} dicts, batch 1, no concatenation),
which runs in its own virtual environment (`--gptqmodel-python`, default
$MAVERICK_QUANT_GPTQMODEL_PYTHON or ~/.cache/maverick-quant/gptqmodel-7.6.0-venv/bin/python;
this script runs itself there with `--gm-worker`). Candidates:

- GPTQModel: `QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False, device="cpu")`,
  everything else at its defaults (damp_percent 0.05 + 0.01 steps on failure, act_group_aware
  on, mse 0, true_sequential), the model loaded in fp32 (`--gm-dtype`; GPTQModel's own CPU
  default would be bf16), saved in GPTQ (v1) format.
- Ours: `quantize --method gptq --bits 4 --group-size 128 --sym --calib DIR` at our default
  damp (0.01) and at GPTQModel's (0.05); `--damps` picks.
- RTN at the same grid (ours), the floor of "RTN gap closed" = (RTN ppl - ppl) / (RTN ppl - fp32 ppl).

GPTQModel is given the model folder itself (`sources.smollm2_hf_dir`, whose config.json no
longer carries the `quantization_config: {quant_method: gguf}` of the GGUF-to-HF conversion:
GPTQModel.load took the folder for a quantized checkpoint and failed in
`validate_checkpoint_qweights`).

Every candidate is scored with `maverick-quant validate` against the fp32 reference on the
first `--windows` (40) non-overlapping `--ctx` (512) token windows of WikiText-2 raw test (GPTQ
protocol); GPTQModel's output folder is passed to validate as it is (our GPTQ reader
dequantizes it). That reading is checked against GPTQModel's own inference
(tests/clients/gptqmodel_logits.py, GPTQModel.load in fp16): the distance of its logits to our
dequantized model's, relative to our dequantized model's distance to the fp32 model
(tests/test_gptqmodel_client.py accepts < 0.2), on the first 2 x 128 test tokens.

Quantize wall time and peak RSS are those of the whole quantize process (start, model load,
calibration, save), from os.wait4 on it; the tool's own figure is shown beside (ours: the
bundle manifest's seconds; GPTQModel: its `quantize()` call alone). Outputs are kept in
--work and reused by a rerun. Prints a Markdown table; --json writes figures.

    python benchmarks/vs_gptqmodel.py --work /tmp/mq-vs-gm --json /tmp/mq-vs-gm/figures.json
    python benchmarks/vs_gptqmodel.py --work /tmp/mq-vs-gm16 --samples 16   # both tools on 16 windows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from head_to_head import DATA, REPO, cached_cost, calibrate_once, figures_of, quantize_ours, validate

DEFAULT_GM_PYTHON = Path(os.environ.get("MAVERICK_QUANT_GPTQMODEL_PYTHON") or
                         Path.home() / ".cache" / "maverick-quant" / "gptqmodel-7.6.0-venv" / "bin" / "python")
CLIENT = REPO / "tests" / "clients" / "gptqmodel_logits.py"
GM_ENV = {"GPTQMODEL_CPU_WORKERS": "2", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
GRID = ["--bits", "4", "--group-size", "128", "--sym"]


def gm_worker(spec_path: str) -> None:
    """In GPTQModel's venv: quantize spec["model"] on the token ids spec["tokens"] (.npy [S, L]),
    save to spec["out"], write the effective settings and the quantize() seconds to spec["result"]."""
    import numpy as np
    from gptqmodel import GPTQModel, QuantizeConfig

    spec = json.loads(Path(spec_path).read_text())
    ids = np.load(spec["tokens"], allow_pickle=False)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    config = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False, device="cpu",
                            **({"damp_percent": spec["damp"]} if spec.get("damp") is not None else {}))
    model = GPTQModel.load(spec["model"], config, dtype=getattr(torch, spec["dtype"]))
    dtype = str(next(model.model.parameters()).dtype)
    started = time.perf_counter()
    model.quantize(calibration, batch_size=spec["batch"])
    seconds = time.perf_counter() - started
    model.save(spec["out"])
    Path(spec["result"]).write_text(json.dumps({
        "quantize_call_seconds": seconds, "model_dtype": dtype, "windows": list(ids.shape),
        "damp_percent": config.damp_percent, "damp_auto_increment": config.damp_auto_increment,
        "act_group_aware": config.act_group_aware, "desc_act": config.desc_act, "mse": config.mse,
        "static_groups": config.static_groups, "true_sequential": config.true_sequential,
        "fallback": str(config.fallback), "format": str(config.format), "torch_threads": torch.get_num_threads(),
    }, indent=2))


def quantize_gm(python: Path, model_dir: Path, tokens: Path, out: Path, damp: float | None, dtype: str,
                batch: int) -> dict:
    result, spec = out.with_name(out.name + ".result.json"), out.with_name(out.name + ".spec.json")
    spec.write_text(json.dumps({"model": str(model_dir), "tokens": str(tokens), "out": str(out), "damp": damp,
                                "dtype": dtype, "batch": batch, "result": str(result)}))
    cost = cached_cost(out, [str(python), __file__, "--gm-worker", str(spec)], env={**os.environ, **GM_ENV})
    settings = json.loads(result.read_text())
    return {**cost, "tool_seconds": settings["quantize_call_seconds"], "gptqmodel": settings}


@torch.no_grad()
def check_gm_reading(python: Path, model_dir: Path, export: Path, work: Path, tokens: int = 128,
                     backend: str = "gptq_torch") -> dict:
    """GPTQModel's own logits of its checkpoint vs our dequantized reading of it (and vs fp32).
    Backend gptq_torch: the CPU kernel GPTQModel picks itself (gptq_torch_aten) refuses this
    model at group 128 ("_weight_int4pack_mm_cpu: expect K to be divisible by qGroupSize, got
    K:576, qGroupSize:128": 576 = 4.5 groups)."""
    import numpy as np

    from maverick_quant.calibration.data import eval_windows, load_tokenizer
    from maverick_quant.streaming import open_source
    from maverick_quant.validation.evaluate import open_candidate

    from smollm2_quality import final_hidden

    ids = eval_windows(DATA / "wiki.test.raw", load_tokenizer(model_dir), 512, 2)[:, :tokens].contiguous()
    np.save(work / "check-ids.npy", ids.numpy(), allow_pickle=False)
    done = subprocess.run([str(python), str(CLIENT), str(export), "gptqmodel", str(work / "check-ids.npy"),
                           str(work / "check-logits.npy"), backend], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **GM_ENV})
    if done.returncode:
        return {"error": (done.stdout[-1500:] + done.stderr[-1500:])}
    theirs = torch.from_numpy(np.load(work / "check-logits.npy", allow_pickle=False)).float()
    model, hidden = final_hidden(open_candidate(export), ids)
    ours = model.logits(hidden)
    model, hidden = final_hidden(open_source(model_dir), ids)
    reference = model.logits(hidden)
    return {"backend": backend, "client": json.loads(done.stdout.strip().splitlines()[-1]), "tokens": list(ids.shape),
            "client_vs_ours_over_ours_vs_fp32": float((theirs - ours).norm() / (ours - reference).norm()),
            "top1_client_vs_ours": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--gm-worker":
        return gm_worker(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--damps", type=float, nargs="*", default=[0.01, 0.05], help="our GPTQ runs' --damp values")
    parser.add_argument("--gm-damp", type=float, default=None, help="GPTQModel damp_percent (default: its own)")
    parser.add_argument("--gm-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--gm-batch", type=int, default=1)
    parser.add_argument("--gptqmodel-python", type=Path, default=DEFAULT_GM_PYTHON)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import numpy as np

    from maverick_quant.calibration.data import CalibrationSet
    from maverick_quant.sources import smollm2_hf_dir

    model_dir = smollm2_hf_dir()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    calib = calibrate_once(model_dir, work, args.samples, args.seq_len)
    tokens = work / f"calib-{args.samples}x{args.seq_len}-input_ids.npy"
    ids = CalibrationSet.load(calib).input_ids
    np.save(tokens, ids.numpy(), allow_pickle=False)
    calib_note = f"{ids.shape[0]} x {ids.shape[1]}"

    rows: dict[str, dict] = {}
    candidates = {"rtn-w4-g128-sym (ours)": (work / "rtn-w4-g128-sym", "ours", ["--method", "rtn", *GRID])}
    for damp in args.damps:
        candidates[f"gptq-w4-g128-sym damp {damp:g} (ours)"] = (
            work / f"gptq-w4-g128-sym-damp{damp:g}", "ours", ["--method", "gptq", *GRID, "--damp", f"{damp:g}"])
    gm_damp = "default" if args.gm_damp is None else f"{args.gm_damp:g}"
    candidates[f"gptq-w4-g128-sym damp {gm_damp} (GPTQModel 7.6.0, {args.gm_dtype})"] = (
        work / f"gptqmodel-w4-g128-sym-damp{gm_damp}-{args.gm_dtype}", "gptqmodel", [])
    for name, (out, tool, options) in candidates.items():
        if tool == "ours":
            cost = quantize_ours(model_dir, calib, out, options)
        else:
            cost = quantize_gm(args.gptqmodel_python, model_dir, tokens, out, args.gm_damp,
                               args.gm_dtype, args.gm_batch)
        print(json.dumps({name: cost}), flush=True)
        report, refusal = validate(model_dir, out, work / "reports" / out.name, args.windows, args.ctx)
        rows[name] = {"tool": tool, "path": str(out), "calibration": calib_note, **cost}
        if report is None:
            rows[name]["validate_refused"] = refusal
            print(f"validate refused {out}: {refusal}", flush=True)
            continue
        rows[name].update(figures_of(report))
        if tool == "gptqmodel":
            rows[name]["reading_check"] = check_gm_reading(args.gptqmodel_python, model_dir, out, work)
        print(json.dumps({name: rows[name]}), flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def print_table(rows: dict) -> None:
    scored = {name: r for name, r in rows.items() if "ppl" in r}
    ref = next(iter(scored.values()))["ref_ppl"]
    rtn = next(r["ppl"] for name, r in scored.items() if name.startswith("rtn"))
    calibration = next(iter(rows.values()))["calibration"]
    tokens = next(iter(scored.values()))["scored_tokens"]
    print(f"\ncalibration {calibration} tokens (the same ids for both tools); {tokens} scored tokens\n")
    print("| candidate | perplexity | ppl ratio | RTN gap closed | KL mean | top-1 | quantize s (tool's own) "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| fp32 reference | {ref:.3f} | | | | | | |")
    for name, r in rows.items():
        if "ppl" not in r:
            print(f"| {name} | validate refused: {r['validate_refused'][:120]} | | | | | | |")
            continue
        closed = "" if name.startswith("rtn") else f"{(rtn - r['ppl']) / (rtn - ref):.1%}"
        print(f"| {name} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | {closed} | {r['kl_mean']:.4f} | {r['top1']:.4f} | "
              f"{r['wall_seconds']:.0f} ({r['tool_seconds'] or 0:.0f}) | {r['peak_rss_mib']:.0f} |")
    for name, r in rows.items():
        if "reading_check" in r:
            print(f"\n{name}: our reading of its checkpoint vs GPTQModel's own inference: {r['reading_check']}")


if __name__ == "__main__":
    main()
