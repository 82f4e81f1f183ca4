"""The 4-bit runtime layout, the torch reference, the CPU int4 path, and the kernel-backed
modules that `validate --kernels` and `generate` run (Triton: test_kernels_triton.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maverick_quant.bundle import Bundle, encode_quantized
from maverick_quant.calibration.moe import route, routed_forward
from maverick_quant.cli import cli
from maverick_quant.compress import pack
from maverick_quant.compress.kernels.backends import (Backend, CpuInt4Backend, cpu_int4_available, dequantize,
                                                      get_backend)
from maverick_quant.compress.kernels.layout import Int4Weight, concat_outputs, to_export_tensors
from maverick_quant.runtime import KernelModel, backend_named, load_quantized_model
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.errors import InputError
from maverick_quant.streaming import StreamingModel, open_source
from tests.conftest import make_tiny_llama4
from tests.kernel_cases import random_quantized

LENGTH = 24


def run(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def assert_same_weight(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert torch.equal(a.codes, b.codes) and torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.scales.half(), b.scales.half())


@pytest.mark.parametrize("symmetric", [True, False])
def test_runtime_layout_is_the_bundle_form_and_converts_to_every_export_layout(symmetric: bool) -> None:
    weight = random_quantized(48, 256, 64, symmetric)
    weight = dataclasses.replace(weight, zeros=weight.zeros.clamp(min=1))  # GPTQ v1 holds zero points 1..15
    runtime = Int4Weight.from_quantized(weight)
    assert runtime.symmetric == symmetric and runtime.packed.shape == (48, 128)
    assert torch.equal(runtime.packed, encode_quantized("w", weight)["w.codes"])  # the bundle's bytes, not a repack
    assert_same_weight(runtime.to_quantized(), weight)
    readers = {"gptq": pack.from_gptq_tensors, "awq": pack.from_awq_tensors, "compressed-tensors": pack.from_compressed_tensors}
    for layout, read in readers.items():
        back = read(to_export_tensors(runtime, layout), 4, 64)
        assert torch.equal(back.dequantize(), weight.dequantize()), layout


def test_layout_refuses_what_the_kernels_cannot_run() -> None:
    eight_bit = QuantizedWeight(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 2).half(),
                                torch.full((16, 2), 128, dtype=torch.uint8), 8, 32)
    with pytest.raises(ValueError, match="layers.0.mlp.up_proj: .*8-bit"):
        Int4Weight.from_quantized(eight_bit, "layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="group size 16"):
        Int4Weight.from_quantized(random_quantized(16, 64, 16, True), "w")


def test_reference_backend_is_dequantize_then_matmul_and_llama4_routing() -> None:
    """Linear: x W_hat^T. Experts: the same numbers as the calibration's routed forward
    (score on the input, only routed tokens), written independently."""
    backend = Backend()
    weight = random_quantized(40, 128, 32, False)
    x = torch.randn(5, 128)
    assert torch.equal(backend.linear(x, Int4Weight.from_quantized(weight)), x @ weight.dequantize().T)

    experts, hidden, inter = 4, 64, 32
    gate, up = random_quantized(inter, hidden, 32, False, experts, 1), random_quantized(inter, hidden, 32, True, experts, 2)
    down = random_quantized(hidden, inter, 32, False, experts, 3)
    x = torch.randn(12, hidden)
    routing = route(x, torch.randn(experts, hidden), top_k=2)
    gate_up = concat_outputs([Int4Weight.from_quantized(gate), Int4Weight.from_quantized(up)])
    out = backend.experts(x, routing.choice, routing.scores, backend.prepare_experts(gate_up),
                          backend.prepare_experts(Int4Weight.from_quantized(down)), torch.nn.functional.silu)
    expected = routed_forward(x, routing, {"gate_proj": gate.dequantize(), "up_proj": up.dequantize(),
                                           "down_proj": down.dequantize()}, torch.nn.functional.silu)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_int4_op_matches_the_reference(group: int, symmetric: bool) -> None:
    if not cpu_int4_available():
        pytest.skip("this torch build has no aten._weight_int4pack_mm_for_cpu")
    weight = Int4Weight.from_quantized(random_quantized(64, 256, group, symmetric, seed=group))
    backend = CpuInt4Backend()
    for rows in (1, 7):
        x = torch.randn(rows, 256)
        expected = x.bfloat16().float() @ dequantize(weight).T
        out = backend.linear(x, backend.prepare(weight))
        # bf16 activations, scales and zero offsets: errors of a few bf16 ulps of the output scale
        assert (out - expected).abs().max() <= 0.02 * expected.abs().max()


def test_cpu_int4_leaves_rows_it_cannot_pack_to_the_reference() -> None:
    weight = Int4Weight.from_quantized(random_quantized(40, 64, 32, True))  # 40 rows: not a multiple of 16
    backend = CpuInt4Backend()
    x = torch.randn(3, 64)
    assert torch.equal(backend.linear(x, backend.prepare(weight)), Backend().linear(x, weight))


@pytest.fixture(scope="module")
def dense_bundle(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kernels") / "dense"
    run("quantize", tiny_llama_dir, "--method", "rtn", "--group-size", 32, "--asym", "--out", out, "--no-progress")
    return out


@pytest.fixture(scope="module")
def kernel_llama4_dir(smollm2_dir: Path, tmp_path_factory) -> Path:
    """The tiny Llama 4 with a dense MLP of 64 (the default 48 is no multiple of group 32)."""
    return make_tiny_llama4(smollm2_dir, tmp_path_factory.mktemp("kernel_llama4"), intermediate_size_mlp=64)


@pytest.fixture(scope="module")
def moe_bundle(kernel_llama4_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kernels") / "moe"
    run("quantize", kernel_llama4_dir, "--method", "rtn", "--group-size", 32, "--out", out, "--no-progress")
    return out


@pytest.fixture(scope="module")
def router_bundle(kernel_llama4_dir: Path, tmp_path_factory) -> Path:
    """The MoE bundle with its routers quantized too (--moe-quantize-router), asymmetric, its
    experts stored in chunks of 7 + 1 (--moe-chunk-mib 1), which the kernels stack as stored."""
    out = tmp_path_factory.mktemp("kernels") / "router"
    run("quantize", kernel_llama4_dir, "--method", "rtn", "--group-size", 32, "--moe-quantize-router", "--asym",
        "--moe-chunk-mib", 1, "--out", out, "--no-progress")
    assert len(Bundle(out).manifest["layers"][1]["experts"]["chunks"]) == 2
    return out


def _ids(seed: int = 0, windows: int = 2) -> torch.Tensor:
    return torch.randint(0, 49152, (windows, LENGTH), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["dense_bundle", "moe_bundle", "router_bundle"])
def test_kernel_model_computes_the_dequantized_bundle(which: str, request) -> None:
    """Reference kernels: the same logits as the dequantized bundle (so QuantMoE's routing is
    transformers' Llama4TextMoe; a quantized router routes with its dequantized values); the
    CPU int4 op: the same up to bf16 activations."""
    bundle = Bundle(request.getfixturevalue(which))
    ids = _ids()
    expected = StreamingModel(bundle).forward(ids)
    torch.testing.assert_close(KernelModel(bundle, "reference").forward(ids), expected, rtol=1e-4, atol=1e-4)
    if cpu_int4_available():
        fast = KernelModel(bundle, "cpu-int4").forward(ids)
        assert (fast.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
        assert (fast - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.parametrize("which", ["dense_bundle", "moe_bundle"])
def test_generation_with_the_kv_cache_is_greedy_decoding_of_the_bundle(which: str, request) -> None:
    """transformers' generate on the kernel-backed model (KV cache, one token at a time through
    QuantLinear/QuantMoE) picks the tokens a full re-forward of the dequantized bundle picks."""
    bundle = Bundle(request.getfixturevalue(which))
    model = load_quantized_model(bundle, "reference", torch.float32)
    prompt = _ids(3, windows=1)[:, :6]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                               pad_token_id=0)
    streaming, ids = StreamingModel(bundle), prompt
    for _ in range(5):
        ids = torch.cat([ids, streaming.forward(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_generate_and_validate_run_a_bundle_on_the_kernels(dense_bundle: Path, tiny_llama_dir: Path,
                                                           small_text_file: Path, tmp_path: Path) -> None:
    output = run("generate", dense_bundle, "--prompt", "The harbour", "--max-new-tokens", 4, "--kernels", "reference")
    assert "4 tokens in" in output and "tokens/s with the prompt's prefill, backend reference on cpu" in output
    for kernels in ("reference", "auto", None):
        options = ["--kernels", kernels] if kernels else []
        run("validate", "--reference", tiny_llama_dir, "--candidate", dense_bundle, "--data", small_text_file,
            "--ctx", LENGTH, "--max-windows", 2, "--report", tmp_path / str(kernels), "--no-progress", *options)
    result = CliRunner().invoke(cli, ["validate", "--reference", str(tiny_llama_dir), "--candidate", str(dense_bundle),
                                      "--data", str(small_text_file), "--report", str(tmp_path / "cuda-on-cpu"),
                                      "--kernels", "cuda", "--device", "cpu"])
    assert result.exit_code == 2 and "--kernels cuda runs on cuda, and --device is cpu" in result.output
    result = CliRunner().invoke(cli, ["validate", "--reference", str(tiny_llama_dir), "--candidate", str(tiny_llama_dir),
                                      "--data", str(small_text_file), "--report", str(tmp_path / "float"),
                                      "--kernels", "reference"])  # a float candidate: named (it read <CheckpointSource ...>)
    assert result.exit_code == 2 and f"{tiny_llama_dir}: the kernels run a quantized bundle" in result.output
    result = CliRunner().invoke(cli, ["generate", str(dense_bundle), "--prompt", "x", "--kernels", "cpu-int4",
                                      "--device", "meta"])
    assert result.exit_code == 2 and "--device='meta': expected auto, cpu, cuda or cuda:N" in result.output
    with_kernels, auto, dequantized = (json.loads((tmp_path / name / "report.json").read_text())
                                       for name in ("reference", "auto", "None"))
    assert with_kernels["kernels"] == "reference" and dequantized["kernels"] is None
    assert auto["kernels"] == get_backend("auto", "cpu").name != "auto"  # the backend that ran, not the request
    assert with_kernels["candidate"]["ppl"] == pytest.approx(dequantized["candidate"]["ppl"], rel=1e-4)


def test_a_tied_bundle_holds_one_embedding_and_generation_stops_at_the_saved_eos(tokenizer_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """A tied lm_head is the embedding itself (one copy, as transformers ties it), and the EOS
    ids of generation_config.json (where instruct models list their end of turn) stop greedy
    generation: with the first token it would generate made an EOS, it stops after that token."""
    from tests.conftest import make_tiny_llama

    model_dir = make_tiny_llama(tokenizer_dir, tmp_path / "tied", tie_word_embeddings=True)
    run("quantize", model_dir, "--method", "rtn", "--group-size", 32, "--out", tmp_path / "bundle", "--no-progress")
    bundle = Bundle(tmp_path / "bundle")
    model = load_quantized_model(bundle, "reference", torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = _ids(5, windows=1)[:, :6]
    torch.testing.assert_close(model(prompt).logits, StreamingModel(bundle).forward(prompt), rtol=1e-4, atol=1e-4)
    first = int(model(prompt).logits[0, -1].argmax())
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, first]}))  # the bundle copies it
    run("quantize", model_dir, "--method", "rtn", "--group-size", 32, "--out", tmp_path / "stops", "--no-progress")
    model = load_quantized_model(Bundle(tmp_path / "stops"), "reference", torch.float32)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + 1 and int(out[0, -1]) == first


def test_quantize_says_when_the_kernels_cannot_run_its_bundle(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Group 64 does not divide the tiny Llama's K = 96 or 160: quantize says generate and validate
    --kernels will refuse it (they did, with no word from quantize); group 32 runs."""
    for group, refused in ((64, True), (32, False)):
        output = run("quantize", tiny_llama_dir, "--method", "rtn", "--group-size", group, "--out", tmp_path / str(group),
                     "--no-progress")
        assert ("the 4-bit kernels (generate, validate --kernels) cannot run" in output) is refused, output
        assert ("is not a multiple of the group size 64" in output) is refused, output


def test_generate_refuses_an_empty_prompt_without_a_traceback(dense_bundle: Path) -> None:
    result = CliRunner().invoke(cli, ["generate", str(dense_bundle), "--prompt", "", "--kernels", "reference"])
    assert result.exit_code == 2 and "--prompt: empty" in result.output, result.output


def test_generate_on_triton_without_a_gpu_computes_in_fp32(moe_bundle: Path) -> None:
    """Triton's CPU interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584):
    on the interpreter `generate` runs fp32, and the prompt's GEMM (11 rows) and the decode
    GEMVs pick the reference's tokens."""
    prompt = "The harbour master counted the boats twice before the storm came in"
    texts = {kernels: run("generate", moe_bundle, "--prompt", prompt, "--max-new-tokens", 4, "--kernels", kernels,
                          "--device", "cpu").split("\n")[0] for kernels in ("reference", "triton")}
    assert texts["triton"] == texts["reference"], texts


def test_a_kernel_backed_moe_candidate_still_gets_its_experts_measured(moe_bundle: Path,
                                                                       kernel_llama4_dir: Path) -> None:
    """A kernel-backed bundle runs its MoE layers whole, so its routing is not seen (no routing
    agreement), but each expert is still measured, on the bundle's weights read as a dequantized
    candidate's are (so the errors are equal), with the kernel layer's own norm."""
    from maverick_quant.validation.evaluate import evaluate

    windows = _ids(4)
    summaries = [evaluate(open_source(kernel_llama4_dir), Bundle(moe_bundle), windows, show_progress=False,
                          kernels=kernels).summary for kernels in ("reference", None)]
    with_kernels, dequantized = ([row["rel_error"] for row in s["experts"]["per_expert"]] for s in summaries)
    assert len(with_kernels) == 16 and with_kernels == pytest.approx(dequantized, rel=1e-6)
    assert "routing" not in summaries[0] and summaries[1]["routing"]["agreement"]["min"] > 0


def test_kernels_refuse_a_float_model_a_grid_they_cannot_run_and_unknown_backends(tiny_llama_dir: Path,
                                                                                   tiny_llama4_dir: Path,
                                                                                   tmp_path: Path) -> None:
    run("quantize", tiny_llama4_dir, "--method", "rtn", "--group-size", 32, "--out", tmp_path / "b", "--no-progress")
    with pytest.raises(InputError, match="layers.0.feed_forward.down_proj: K=48 is not a multiple of the group size 32"):
        KernelModel(Bundle(tmp_path / "b"), "reference").layer(0)
    with pytest.raises(InputError, match="quantized bundle"):
        KernelModel(open_source(tiny_llama_dir), "reference")
    bundle = Bundle(tmp_path / "b")
    stored = bundle.quantized_layer
    bundle.quantized_layer = lambda index: (stored(index)[0], {k: v for k, v in stored(index)[1].items()
                                                               if k != "input_layernorm.weight"})
    with pytest.raises(InputError, match=r"layer 1 has tensors neither quantized nor stored: \['input_layernorm.weight'\]"):
        KernelModel(bundle, "reference").layer(1)
    with pytest.raises(ValueError, match="kernel backend 'tensorrt'"):
        get_backend("tensorrt")
    with pytest.raises(InputError, match="kernel backend cpu-int4 needs the CPU"):
        backend_named("cpu-int4", "cuda")  # checked when chosen, not at the first forward
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="kernel backend cuda needs a CUDA device"):
            KernelModel(bundle, "cuda")
    result = CliRunner().invoke(cli, ["generate", str(tiny_llama_dir), "--prompt", "x"])
    assert result.exit_code == 2 and "not a bundle" in result.output
