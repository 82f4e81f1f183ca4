"""The compute device (`--device`, recipe `quantize.device`): layers, statistics and solves on
it, the hidden-state cache on the host; devices this machine lacks refused before any work.

Without a GPU, placement is checked on PyTorch's meta device: a tensor left on the host where
the layer's device is expected fails an elementwise op there exactly as it would on CUDA. The
CUDA run itself is checked where a GPU is present (skipped otherwise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

from maverick_quant.calibration.capture import capture_samples
from maverick_quant.calibration.moe import mean_outer, policy_hessian, sample_tokens
from maverick_quant.cli import cli
from maverick_quant.compress.awq import candidate_scales, clip_weights, output_loss
from maverick_quant.groups import group_hessian
from maverick_quant.recipe import AWQSpec, ExpertPolicy, MoESpec, QuantSpec
from maverick_quant.streaming import StreamingModel, open_source

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_layers_and_their_statistics_live_on_the_compute_device(tiny_llama4_dir: Path) -> None:
    """Every decoder layer (dense and MoE, chunked attention) runs on the device with hidden
    states kept on the host, and each group's Hessian (plain, and attention-mixed for v_proj)
    is accumulated there."""
    model = StreamingModel(open_source(tiny_llama4_dir), device="meta", batch=2)
    hidden = torch.randn(3, 40, model.config.hidden_size)  # longer than the 16-token attention chunks
    for index in range(model.num_layers):
        layer = model.layer(index)
        assert {p.device.type for p in layer.parameters()} == {"meta"}
        assert model.apply(layer, hidden[:2], slice(0, 2)).device.type == "meta"
        for group in model.plan(index).groups:
            H, tokens = group_hessian(model, layer, hidden, group)
            width = layer.get_submodule(group.linears[0]).in_features
            assert H.device.type == "meta" and H.shape[-1] == width and tokens >= hidden.shape[0] * hidden.shape[1]
    assert hidden.device.type == "cpu"


def test_awq_search_and_expert_hessians_stay_on_the_device(tiny_llama4_dir: Path) -> None:
    model = StreamingModel(open_source(tiny_llama4_dir), device="meta", batch=2)
    layer, group = model.layer(0), model.plan(0).scale_groups[0]
    with capture_samples(layer, (group.linears[0],), stride=7, stop=True) as samples:
        model.feed_layer(layer, torch.randn(2, 24, model.config.hidden_size))
    sample = samples[group.linears[0]]
    weights = [layer.get_submodule(name).weight.data for name in group.linears]
    awq, grid = AWQSpec(grid=4, clip_grid=4), QuantSpec(bits=4, group_size=32)
    candidates = candidate_scales(sample.mean_abs, None, awq)
    losses = output_loss(sample.sample, weights, grid)(candidates)
    clipped = clip_weights(weights[0], sample.sample, grid, awq)
    assert {t.device.type for t in (candidates, losses, clipped)} == {"meta"}
    rows = torch.randn(10, 64, device="meta")
    assert sample_tokens(100, 10, "meta").device.type == "meta"
    for policy in (ExpertPolicy.ROUTED, ExpertPolicy.MIXED):
        assert policy_hessian(policy, rows, rows, MoESpec(), 64, "meta").device.type == "meta"
    assert policy_hessian(ExpertPolicy.RTN, None, None, MoESpec(), 64, "meta") is None  # H = I, in closed form
    assert mean_outer(rows[:0], 64).device.type == "meta"


def test_a_kernel_backed_bundle_runs_its_layers_on_the_device(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """validate --kernels: the 4-bit weights (and a layer's float tensors) go to the device."""
    from maverick_quant.bundle import Bundle
    from maverick_quant.runtime import KernelModel

    result = CliRunner().invoke(cli, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--group-size", "32",
                                      "--out", str(tmp_path / "b"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    model = KernelModel(Bundle(tmp_path / "b"), "reference", device="meta")
    layer = model.layer(0)
    weights = [module.prepared for module in layer.modules() if hasattr(module, "prepared")]
    assert weights and {w.packed.device.type for w in weights} == {"meta"}
    assert {p.device.type for p in layer.parameters()} == {"meta"}
    assert model.apply(layer, torch.randn(2, 8, model.config.hidden_size)).device.type == "meta"


@no_cuda
def test_a_device_this_machine_lacks_is_refused_before_any_work(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--device", "cuda",
                                      "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 2 and "--device='cuda': this machine has no CUDA device" in result.output
    assert not any(tmp_path.iterdir())
    result = CliRunner().invoke(cli, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--device", "tpu",
                                      "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 2 and "expected auto, cpu, cuda or cuda:N" in result.output
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "quantize": {"method": "rtn", "device": "cuda:1"}}))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "quantize.device='cuda:1'" in result.output
    assert not (tmp_path / "run").exists()
    for command in (["calibrate", str(tiny_llama_dir), "--data", "self", "--coverage", "--out", str(tmp_path / "c")],
                    ["imatrix", str(tiny_llama_dir), "--data", "self", "--out", str(tmp_path / "m.gguf")]):
        result = CliRunner().invoke(cli, [*command, "--device", "cuda"])
        assert result.exit_code == 2 and "--device='cuda': this machine has no CUDA device" in result.output, command
    assert not (tmp_path / "c").exists() and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("name,env,gpus,expected", [
    ("cuda", {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, 4, "cuda:3"),
    ("cuda", {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, 1, "cuda:0"),  # one visible GPU per process
    ("cuda", {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, 2, "LOCAL_RANK=3 has no GPU of its own on this machine's 2"),
    ("cuda:0", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 2, "under torchrun puts every process on that GPU"),
    ("cuda:1", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 2, "cuda:1"),  # its own: `run` resolves the device twice
    ("cuda:1", {}, 2, "cuda:1"),
])
def test_each_torchrun_process_gets_a_gpu_of_its_own(monkeypatch, name: str, env: dict, gpus: int, expected: str) -> None:
    """--device cuda:0 put every rank on GPU 0, and LOCAL_RANK 3 of 2 GPUs shared GPU 1, silently:
    Maverick's 53 GiB per process then ran out of memory at the first MoE layer."""
    from maverick_quant.devices import resolve_device
    from maverick_quant.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if expected.startswith("cuda"):
        assert resolve_device(name) == torch.device(expected)
        assert resolve_device(str(resolve_device(name))) == torch.device(expected)  # a resolved name resolves again
    else:
        with pytest.raises(InputError, match=expected):
            resolve_device(name)


def test_maverick_fits_one_80_gib_gpu_and_64_gib_of_host_memory(tmp_path: Path) -> None:
    """The shipped Maverick recipe's calibration (512 x 2048 tokens) planned for one GPU."""
    result = CliRunner().invoke(cli, ["plan", "maverick", "--samples", "512", "--seq-len", "2048", "--device", "cuda",
                                      "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["device"] == "cuda" and 16 * 2**30 < plan["gpu_bytes"] < 80 * 2**30
    assert plan["peak_host_bytes"] < 64 * 2**30
    tokens = 512 * 2048 * 5120 * 4
    assert plan["peak_gpu_layer"]["block_caches"] == 2 * tokens and plan["peak_layer"]["cache"] == tokens
    gpu_gib, host_gib = -(-(plan["gpu_bytes"] + 2**29) // 2**30), -(-plan["peak_host_bytes"] // 2**30)
    assert f"needs: one GPU with {gpu_gib} GiB of free memory and {host_gib} GiB of free host RAM" in result.output
    assert gpu_gib <= 80 and host_gib <= 64
    if not torch.cuda.is_available():
        assert plan["seconds"] is None and "not estimated" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantize_on_cuda_matches_the_cpu_run(tiny_llama4_dir: Path, small_text_file: Path, tmp_path: Path) -> None:
    """The same GPTQ run on the GPU and on the CPU: same routing audit, losses within fp noise."""
    from maverick_quant.bundle import Bundle

    bundles = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        result = CliRunner().invoke(cli, ["quantize", str(tiny_llama4_dir), "--data", str(small_text_file), "--samples", "8",
                                          "--seq-len", "64", "--group-size", "32", "--device", device, "--out", str(out),
                                          "--no-progress"])
        assert result.exit_code == 0, result.output
        bundles[device] = Bundle(out)
    manifests = {device: json.loads((tmp_path / device / "manifest.json").read_text()) for device in bundles}
    assert manifests["cuda"]["summary"]["peak_device_mib"] > 0
    cpu, gpu = (manifests[d]["summary"]["mean_rel_loss"] for d in ("cpu", "cuda"))
    assert abs(gpu / cpu - 1) < 0.05
    reports = {}
    for device in ("cpu", "cuda"):  # validation of the same bundle on both devices
        result = CliRunner().invoke(cli, ["validate", "--reference", str(tiny_llama4_dir), "--candidate", str(tmp_path / "cuda"),
                                          "--data", str(small_text_file), "--report", str(tmp_path / f"report-{device}"),
                                          "--ctx", "32", "--max-windows", "4", "--device", device, "--no-progress"])
        assert result.exit_code == 0, result.output
        reports[device] = json.loads((tmp_path / f"report-{device}" / "report.json").read_text())
    assert reports["cuda"]["device"] == "cuda:0"
    assert abs(reports["cuda"]["candidate"]["ppl"] / reports["cpu"]["candidate"]["ppl"] - 1) < 1e-3


def test_resuming_on_another_device_warns_and_is_recorded(tmp_path: Path) -> None:
    """The device is not part of a run's identity (a run may go on after its machine died), but
    going on elsewhere mixes two devices' rounding: the run warns and the manifest says so."""
    from maverick_quant.resume import warn_if_resumed_elsewhere
    from maverick_quant.resume import RunState

    state = RunState(tmp_path, {})
    assert warn_if_resumed_elsewhere(state, "cpu") is None  # a new run: nothing recorded
    state.save_progress(3, None, "NVIDIA H100 80GB HBM3")
    with pytest.warns(UserWarning, match="computed on NVIDIA H100 80GB HBM3 on cpu"):
        assert warn_if_resumed_elsewhere(state, "cpu") == "NVIDIA H100 80GB HBM3"
    state.save_progress(4, None, "cpu")
    assert warn_if_resumed_elsewhere(state, "cpu") is None


def test_a_cpu_resumed_with_another_thread_count_is_another_device() -> None:
    """BLAS reductions round by thread count, so a CPU run resumed with other threads is not
    byte-identical; the label was "cpu" whatever the threads, and such a resume never warned."""
    from maverick_quant.devices import device_label

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = device_label(torch.device("cpu"))
        torch.set_num_threads(2)
        two = device_label(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert one.startswith("cpu") and one.endswith("(1 threads)") and two.endswith("(2 threads)") and one != two


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_coverage_and_imatrix_on_cuda_match_the_cpu_run(tiny_llama4_dir: Path) -> None:
    """`calibrate --coverage` and `imatrix --device` run the float model's layers on the GPU:
    the same tokens per expert, and the same input square sums up to fp noise. (Called as
    functions: the GPU machine has no gguf package to write the imatrix file with.)"""
    from maverick_quant.calibration.imatrix import collect_imatrix
    from maverick_quant.coverage import expert_coverage

    source = open_source(tiny_llama4_dir)
    ids = torch.randint(0, 49152, (4, 48), generator=torch.Generator().manual_seed(0))
    coverage = {device: expert_coverage(source, ids, show_progress=False, device=device) for device in ("cpu", "cuda")}
    assert coverage["cuda"]["layers"] == coverage["cpu"]["layers"]
    sums = {device: collect_imatrix(source, ids, show_progress=False, device=device).entries for device in ("cpu", "cuda")}
    assert sums["cuda"].keys() == sums["cpu"].keys()
    for key, value in sums["cpu"].items():
        torch.testing.assert_close(sums["cuda"][key].sum2, value.sum2, rtol=1e-3, atol=1e-6)
        assert torch.equal(sums["cuda"][key].counts, value.counts)


class _BytesToDevice(TorchDispatchMode):
    """Counts the bytes of host tensors copied to `device` while active."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.bytes = device, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu"
                and isinstance(out, torch.Tensor) and out.device.type == self.device):
            self.bytes += args[0].nbytes
        return out


@pytest.mark.parametrize("export", [None, "gptq"])
def test_a_quantized_source_dequantizes_where_the_model_computes(tiny_llama4_dir: Path, small_text_file: Path,
                                                                 tmp_path: Path, export: str | None) -> None:
    """A bundle (or packed export) read by a StreamingModel on a device dequantizes there: its
    codes cross to the device, not fp32 weights (here the meta device stands in for a GPU: every
    quantized linear, routed experts included, comes back on it; float tensors do not). The
    source itself is left as it was: read directly, or by a model elsewhere, it stays on the CPU."""
    from maverick_quant.validation.evaluate import open_candidate

    bundle = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["quantize", str(tiny_llama4_dir), "--method", "rtn",
                                      "--group-size", "32", "--out", str(bundle), "--no-progress"])
    assert result.exit_code == 0, result.output
    path = bundle
    if export is not None:
        path = tmp_path / export
        result = CliRunner().invoke(cli, ["export", str(bundle), "--format", export, "--out", str(path), "--no-progress"])
        assert result.exit_code == 0, result.output
    source = open_candidate(path)
    on_cpu = source.layer_tensors(1)
    assert {t.device.type for t in on_cpu.values()} == {"cpu"}
    model = StreamingModel(source, device="meta")
    tensors = model.layer_tensors(1)
    assert model.device.type == "meta" and tensors["self_attn.o_proj.weight"].device.type == "meta"
    assert tensors["input_layernorm.weight"].device.type == "cpu"
    assert all(t.device.type == "meta" for t in model.expert_tensors(1, 0, 2).values())
    assert {name: t.shape for name, t in tensors.items()} == {name: t.shape for name, t in on_cpu.items()}
    with _BytesToDevice("meta") as crossing:  # a bundle's packed codes cross; an export's codes, a byte each
        quantized = [t for t in model.layer_tensors(1).values() if t.device.type == "meta"]  # routed experts included
    per_weight = crossing.bytes / sum(t.numel() for t in quantized)
    assert 0.5 <= per_weight < 0.7 if export is None else 1.0 <= per_weight < 1.2  # + group-32 scales and zeros
    assert {t.device.type for t in source.layer_tensors(1).values()} == {"cpu"}
    assert {t.device.type for t in StreamingModel(source).layer_tensors(1).values()} == {"cpu"}
