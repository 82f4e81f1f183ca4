"""llama.cpp (through llama-cpp-python, installed by .ci/run) loads our GGUF files and computes
what our dequantized bundle computes: SmolLM2 in Q4_0 and a tiny Llama 4 MoE in Q8_0.

llama.cpp rounds activations to 8 bits inside its quantized matmuls and keeps its KV cache in
fp16, so the logits are close, not equal. Measured on SmolLM2 (512 tokens of wiki.test.raw):
Q8_0 top-1 agreement 96.7%, mean KL 0.0024, flat across positions (a rotary mismatch would
grow with position); Q4_0 97.3% / 0.0026 on the 256 tokens of the test below (95.7% / 0.0032 on
the min/max grid before Q4_0 took llama.cpp's scale rule). A wrong layout gives KL in the tenths
(RTN 4-bit vs float is 0.34), so the tests bound the KL at 0.01 and top-1 at 93%. The same
bundles written as F32 GGUFs (llama.cpp's F32 matmuls do not round activations) agree at
top-1 100% / KL 1e-6 on SmolLM2: the issue's 98% holds wherever llama.cpp computes in float.
Our own torch forward with the same 8-bit activation rounding and no llama.cpp loses about the
same KL (0.0028 vs llama.cpp's 0.0027 on today's Q4_0 grid; 512 tokens) and top-1 falls to
97.3% (benchmarks/activation_rounding.py, docs/results.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maverick_quant.bundle import Bundle
from maverick_quant.cli import cli

from conftest import bundle_logits, make_tiny_llama4, require_llama_cpp, run_cli

require_llama_cpp()


def _run(*args) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output


def llama_cpp_logits(gguf_path: Path, tokens: list[int]) -> torch.Tensor:
    """Logits [L, V] llama.cpp computes for `tokens` (one sequence, every position)."""
    from maverick_quant.validation.evaluate import GGUFCandidate

    return GGUFCandidate(gguf_path, threads=2).window_logits(tokens)


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ours || theirs)) over positions of logits [L, V]."""
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    log_p, log_q = ours.double().log_softmax(-1), theirs.double().log_softmax(-1)
    return top1, float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def _text_tokens(model_dir: Path, text_path: Path, count: int) -> list[int]:
    from transformers import AutoTokenizer

    text = text_path.read_text(encoding="utf-8")[:20000]
    return AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"][:count]


@pytest.fixture(scope="module")
def smollm2_q4_0(smollm2_dir: Path, tmp_path_factory) -> Path:
    """SmolLM2 round-to-nearest on Q4_0's grid, as a bundle and its lossless GGUF."""
    root = tmp_path_factory.mktemp("smollm2_gguf")
    _run("quantize", smollm2_dir, "--method", "rtn", "--gguf-grid", "Q4_0", "--out", root / "bundle", "--no-progress")
    _run("export", root / "bundle", "--format", "gguf", "--gguf-type", "Q4_0", "--out", root / "m.gguf")
    return root


def smollm2_agreement(smollm2_dir: Path, bundle_dir: Path, gguf_path: Path, text_path: Path, tmp: Path,
                      tokens: int = 256) -> tuple[float, float]:
    """(top-1 agreement, mean KL) of llama.cpp running `gguf_path` against SmolLM2 `bundle_dir`
    through transformers, on the first `tokens` tokens of `text_path`."""
    ids = _text_tokens(smollm2_dir, text_path, tokens)
    ours = bundle_logits(smollm2_dir, Bundle(bundle_dir), torch.tensor([ids]), tmp / "float")[0]
    return agreement(ours, llama_cpp_logits(gguf_path, ids))


@pytest.mark.slow
def test_llama_cpp_runs_our_smollm2_q4_0_like_our_bundle(smollm2_dir: Path, smollm2_q4_0: Path, wiki_test_path: Path,
                                                          tmp_path: Path) -> None:
    top1, kl = smollm2_agreement(smollm2_dir, smollm2_q4_0 / "bundle", smollm2_q4_0 / "m.gguf", wiki_test_path, tmp_path)
    print(f"\nSmolLM2 Q4_0, 256 tokens: top-1 agreement {top1:.4f}, mean KL {kl:.5f}")
    assert top1 >= 0.93 and kl < 0.01


@pytest.mark.slow
def test_llama_cpp_meets_98_percent_top1_where_it_does_not_round_activations(
        smollm2_dir: Path, smollm2_q4_0: Path, wiki_test_path: Path, tmp_path: Path) -> None:
    """The same bundle as an F32 GGUF (`--gguf-type F32`): llama.cpp's F32 matmuls keep the
    activations in float, and its logits agree with our bundle's at the issue's 98% top-1. The
    Q4_0 file's lower agreement (above) is llama.cpp's 8-bit activation rounding, not our export."""
    _run("export", smollm2_q4_0 / "bundle", "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "f32.gguf")
    top1, kl = smollm2_agreement(smollm2_dir, smollm2_q4_0 / "bundle", tmp_path / "f32.gguf", wiki_test_path, tmp_path)
    print(f"\nSmolLM2 Q4_0 bundle as F32 GGUF, 256 tokens: top-1 agreement {top1:.4f}, mean KL {kl:.6f}")
    assert top1 >= 0.98 and kl < 0.001


def _gguf_accuracy(gguf_path: Path, model_dir: Path, hellaswag: Path, count: int) -> float:
    """HellaSwag accuracy of a GGUF in llama.cpp, each choice run as a whole sequence of its own
    (no shared prefix in the KV cache, as `validate` does it): the mean log-prob of the
    ending's tokens, argmax against the label."""
    from maverick_quant.calibration.data import load_tokenizer
    from maverick_quant.validation.evaluate import GGUFCandidate
    from maverick_quant.validation.hellaswag import encode_task, read_hellaswag

    model, tokenizer, right = GGUFCandidate(gguf_path), load_tokenizer(model_dir), []
    for task in read_hellaswag(hellaswag, count):
        encoded, scores = encode_task(task, tokenizer), []
        for suffix in encoded.suffixes:
            ids = list(encoded.prefix) + list(suffix)
            logprobs = model.window_logits(ids).double().log_softmax(-1)[len(encoded.prefix) - 1 : -1]
            scores.append(logprobs.gather(1, torch.tensor(suffix)[:, None]).mean().item())
        right.append(max(range(len(scores)), key=scores.__getitem__) == task.label)
    return 100 * sum(right) / len(right)


@pytest.mark.slow
def test_validate_runs_a_gguf_candidate_in_llama_cpp(smollm2_dir: Path, smollm2_q4_0: Path, wiki_test_path: Path,
                                                     tmp_path: Path) -> None:
    """`validate --candidate FILE.gguf`: the reference streamed, the candidate's logits from
    llama.cpp; its perplexity agrees with the bundle's through our own path on the same windows."""
    import json

    common = ["--reference", smollm2_dir, "--data", wiki_test_path, "--ctx", 128, "--max-windows", 3,
              "--protocol", "llama.cpp", "--no-progress"]
    hellaswag = wiki_test_path.parents[1] / "hellaswag" / "hellaswag_val_full.txt"
    _run("validate", "--candidate", smollm2_q4_0 / "m.gguf", "--report", tmp_path / "gguf", *common,
         "--gate", "top1_agreement>=0.5", "--hellaswag", hellaswag, "--hellaswag-tasks", 4)
    _run("validate", "--candidate", smollm2_q4_0 / "bundle", "--report", tmp_path / "bundle", *common)
    gguf, bundle = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("gguf", "bundle"))
    assert gguf["protocol"]["name"] == "llama.cpp" and gguf["reference"] == bundle["reference"]
    assert gguf["hellaswag"]["tasks"] == 4
    assert gguf["hellaswag"]["candidate"]["acc"] == pytest.approx(_gguf_accuracy(smollm2_q4_0 / "m.gguf", smollm2_dir,
                                                                                  hellaswag, 4))
    ratio = gguf["candidate"]["ppl"] / bundle["candidate"]["ppl"]
    print(f"\nllama.cpp protocol, 3 x 128: GGUF in llama.cpp {gguf['candidate']['ppl']:.3f}, "
          f"bundle in our path {bundle['candidate']['ppl']:.3f} (ratio {ratio:.4f})")
    assert abs(ratio - 1) < 0.03  # 192 scored tokens; measured 1.2% (benchmarks/gguf_quality.py has 40 x 512)
    _run("export", smollm2_q4_0 / "bundle", "--format", "gguf", "--out", tmp_path / "with-card.gguf",
         "--report", tmp_path / "bundle")
    card = (tmp_path / "with-card.gguf.README.md").read_text()
    assert "## Validation" in card and "top1_agreement" in card


@pytest.mark.parametrize("gguf_type,dims,min_top1,max_kl", [
    ("Q8_0", {}, 0.93, 0.01),
    # Widths of 256: Q4_K super-blocks (o_proj, K = 4 heads x 16, falls back to Q4_1). This random
    # model predicts almost uniformly (median top-1/top-2 probability gap 6e-5), and at these
    # widths llama.cpp's arithmetic (8-bit activations, fp16 KV cache) flips near-ties. Measured
    # top-1 / KL in Q4_K: 0.79 / 0.016 with this calibration text, 0.87 / 0.0097 with another
    # (0.85 / 0.0072 with the earlier 7-bit Q4_1 fallback grid), while the F32 GGUF of the same
    # bundle agrees 1.00 / 2e-7 (checked below: the export is exact, the spread is llama.cpp's
    # rounding). Q4_0 0.91 / 0.0096; Q8_0 with hidden 256 (MLP 64) 0.875 / 0.0012, with hidden 64
    # 1.00 / 0.000005. A wrong Q4_K nibble order gives 0.00 / 0.65.
    ("Q4_K", {"hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 256}, 0.7, 0.05),
])
def test_llama_cpp_runs_our_llama4_moe_like_our_bundle(smollm2_dir: Path, small_text_file: Path, tmp_path: Path,
                                                       gguf_type: str, dims: dict, min_top1: float, max_kl: float) -> None:
    dims = {"intermediate_size_mlp": 64, **dims}
    model_dir = make_tiny_llama4(smollm2_dir, tmp_path / "model", attention_chunk_size=8192, **dims)
    _run("quantize", model_dir, "--data", small_text_file, "--samples", 4, "--seq-len", 32, "--gguf-grid", gguf_type,
         "--out", tmp_path / "bundle", "--no-progress")
    _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", gguf_type, "--out", tmp_path / "m.gguf")
    tokens = torch.randint(0, 49152, (96,), generator=torch.Generator().manual_seed(3)).tolist()
    theirs = llama_cpp_logits(tmp_path / "m.gguf", tokens)
    ours = bundle_logits(model_dir, Bundle(tmp_path / "bundle"), torch.tensor([tokens]), tmp_path / "float")[0]
    top1, kl = agreement(ours, theirs)
    print(f"\ntiny Llama 4 {gguf_type}, {len(tokens)} tokens: top-1 agreement {top1:.4f}, mean KL {kl:.6f}")
    assert top1 >= min_top1 and kl < max_kl
    _run("export", tmp_path / "bundle", "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "f32.gguf")
    top1, kl = agreement(ours, llama_cpp_logits(tmp_path / "f32.gguf", tokens))
    print(f"the same bundle as an F32 GGUF: top-1 agreement {top1:.4f}, mean KL {kl:.2e}")
    assert top1 >= 0.98 and kl < 1e-5


@pytest.mark.slow
def test_llama_cpp_branches_after_a_cached_prefix_equal_whole_sequences(smollm2_dir: Path, smollm2_q4_0: Path,
                                                                        wiki_test_path: Path) -> None:
    """branch_logits (prefix evaluated once, each suffix after it in the KV cache, as the
    HellaSwag path uses it) gives the logits of running prefix + suffix as one sequence: the
    previous suffix's cache entries must not leak into the next one."""
    from maverick_quant.validation.evaluate import GGUFCandidate

    tokens = _text_tokens(smollm2_dir, wiki_test_path, 40)
    prefix, suffixes = tokens[:24], [tokens[24:40], tokens[30:34], tokens[24:25]]
    candidate = GGUFCandidate(smollm2_q4_0 / "m.gguf", threads=2)
    branches = candidate.branch_logits(prefix, suffixes)
    for suffix, branch in zip(suffixes, branches):
        whole = candidate.window_logits(prefix + suffix)[len(prefix) - 1 : -1]
        assert branch.shape == whole.shape
        assert (branch.argmax(-1) == whole.argmax(-1)).all()
        torch.testing.assert_close(branch, whole, atol=2e-2, rtol=0)


def test_a_gguf_candidate_llama_cpp_cannot_load_is_refused_before_the_reference_pass(
        tiny_llama_dir: Path, small_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A truncated or foreign .gguf, or one of another vocabulary, exits 2 naming the file before
    any layer runs (it used to fail inside the first llama.cpp window, after the whole reference
    pass, with a ValueError traceback and exit 1: the code of a failed gate)."""
    from maverick_quant.streaming import StreamingModel

    monkeypatch.setattr(StreamingModel, "layer", lambda *a, **k: pytest.fail("ran a layer before refusing"))
    not_gguf = tmp_path / "bad.gguf"
    not_gguf.write_text("not a gguf at all")
    code, out = run_cli("validate", "--reference", tiny_llama_dir, "--candidate", not_gguf, "--data", small_text_file,
                     "--ctx", 16, "--max-windows", 1, "--report", tmp_path / "r", "--no-progress")
    assert code == 2 and f"{not_gguf}: not a GGUF llama.cpp can load" in out, out
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*"))
    code, out = run_cli("validate", "--reference", tiny_llama_dir, "--candidate", not_gguf, "--data", small_text_file,
                        "--kernels", "reference", "--report", tmp_path / "r", "--no-progress")
    assert code == 2 and "a GGUF candidate runs in llama.cpp: drop --kernels" in out, out  # it was recorded as run
