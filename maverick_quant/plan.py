"""`maverick-quant plan`: what a quantize run will read, write, hold in memory and take, from
config.json and the safetensors headers only (no tensor data).

Memory model of a calibrated run (GPTQ/AWQ, bytes; S windows x L tokens, hidden D, fp32):

    baseline     this process's resident size after importing the model code (measured)
    cache        S * L * D * 4: the hidden states of every window (host memory)
    attention_outputs  S * L * H_q * head_dim * 4 in a layer solved true-sequentially: the inputs of
                 its attention's output projection, kept for the later passes (attention_replay.py;
                 host memory). On the CPU an MoE layer frees them before it reads its experts,
                 its peak; on a GPU they are counted beside the expert reads, which come after
                 them (an overestimate of at most one chunk's reads)
    block_caches 2 * S * L * D * 4 in an MoE layer: the block input x and its output
    routing      S * L * E * 4 in an MoE layer: the router logits of every token
    expert_inputs  (n_chunk + M_c T_s) * D * 4 + 3 * n_hot * I * 4 in an MoE layer: the routed
                 inputs x*score of the busiest chunk of experts (n_chunk tokens in all) and the
                 all-token sample (T_s = min(S L, all_token_sample_size)) of each of its M_c experts solved
                 under `mixed` (the run's policy and min_tokens rule on the expected tokens),
                 then gate, up and their product for the busiest expert (n_hot rows: + T_s if mixed) while its
                 down Hessian is built. Routing is taken as even (S L k / E tokens per expert)
                 unless `plan --coverage` gives the measured tokens per expert
    layer        the layer's dense tensors in fp32, twice (weights and their quantized copy)
    hessians     3 * K^2 * 4 for the widest dense group (H, its Cholesky factor, workspace; not
                 under `awq`, which rounds)
    experts      experts_per_chunk * 12 * (3 D I + D^2 + I^2) (experts.experts_per_chunk); without
                 the Hessians D^2 + I^2 when no expert is solved (`awq`, or every expert `rtn`)
    activations  batch * L * max(3 D, 2 I) * 4 * 2 (one batch's intermediates, twice)
    expert_reads experts_per_chunk * 3 D I * 2: a chunk of bf16 experts read on the host
                 before it moves to the GPU (GPU runs only; on the CPU `experts` holds them)
    final        the model-level tensors (embedding, lm_head, vision tower), read at the end
                 after the caches are freed
    awq_search   (awq, awq+gptq) the scale and clip candidates (plan_awq.py)

On the CPU every term is host memory. On a GPU (devices.py) the DEVICE_TERMS live there and
the host keeps the cache, the attention outputs, the expert reads and the final tensors:

    peak host   = baseline + max(max over layers of the layer's host terms, final)
    peak device = max over layers of the layer's device terms (torch's allocations; the CUDA
                  context, about 0.5 GiB, comes on top)

RTN holds no cache and no Hessian. Time is the forwards' and Hessians' floating-point work
(each sampling pass priced up to the group it stops at, with the attention once past it:
`plan_passes.pass_flops`; the values' attention-mixed Hessians: `gptq_passes`) divided by the measured
fp32 matmul rate of the run's device, plus every GPTQ solve costed as
K * column_seconds + (2 N K^2 + K^3) / gptq_rate, both fitted to two real solves timed on that
device (compute_rates.py; cached in $MAVERICK_QUANT_CACHE, a few seconds the first time), plus
every weight quantized to nearest without a solve (RTN, `awq`, experts under `rtn`) at the
measured `round_seconds_per_weight`, plus,
under `clip_search`, every quantized weight at the search's measured seconds per weight, plus,
under AWQ, its searches (plan_awq.py: weights rounded at the measured rounding rate, outputs as
matmuls, the routed experts read twice), plus the disk work: the checkpoint read once, the bundle and the per-layer hidden states for
`--resume` written, the bundle hashed, each at the rate measured where `plan` runs (disk.py).
A plan for a GPU on a machine without one gives memory and disk time but no compute time.
With `validation` settings it also plans validating the bundle (plan_validation.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maverick_quant.calibration.moe import all_token_sample_size, expected_policies
from maverick_quant.checkpoint import DTYPE_SIZES
from maverick_quant.compute_rates import gptq_flops, measured_busy
from maverick_quant.disk import DiskRates
from maverick_quant.errors import InputError
from maverick_quant.plan_awq import awq_layer_cost
from maverick_quant.plan_passes import gptq_passes, replay_starts
from maverick_quant.plan_outputs import output_bytes
from maverick_quant.plan_validation import ValidationPlan, ValidationSettings, plan_validation, time_validation
from maverick_quant.recipe import CalibSpec, ExpertPolicy, Method, QuantizeSpec

DEVICE_TERMS = frozenset({"layer", "hessians", "activations", "experts", "block_caches", "routing", "expert_inputs",
                          "awq_search"})


@dataclass
class LayerCost:
    """One decoder layer: bytes it needs beside the baseline, and its work in flops."""

    index: int
    memory: dict[str, int]
    matmul_flops: float
    gptq_solves: list[tuple[int, int, int]]  # (count, N, K) of the GPTQ solves
    quantized_weights: int = 0  # weights quantized in the layer (each one searched under clip_search)
    awq_rounded: float = 0.0  # weights AWQ's searches round to nearest (plan_awq.py)
    rounded_weights: float = 0.0  # weights quantized to nearest without a solve (RTN, AWQ's rounding, `rtn` experts)
    expert_rereads: int = 0  # routed-expert weights read a second time (AWQ's block scale search)


@dataclass
class Plan:
    model: str
    quantized_params: int
    quantized_tensors: int
    passthrough_bytes: int
    passthrough_tensors: int
    baseline_bytes: int
    layers: list[LayerCost]
    final_bytes: int
    outputs: dict[str, int]
    seconds: float | None  # None: a GPU plan made where there is no GPU to time
    resume_bytes: int
    assumptions: list[str] = field(default_factory=list)
    device: str = "cpu"  # "cpu" or "cuda": where the DEVICE_TERMS live
    disk_io: dict[str, int] | None = None  # bytes {"read", "write", "hash"} (disk_work)
    disk_seconds: dict[str, float] | None = None  # the same at measured rates (disk.py)
    validation: ValidationPlan | None = None  # validating the bundle, when asked for
    rates: dict | None = None  # the compute rates it was timed with (compute_rates.machine_rates)
    notes: list[str] = field(default_factory=list)  # what the run would warn about (pipeline.rank_deficient_note)

    @property
    def total_seconds(self) -> float | None:
        """Compute and disk work together (None while the compute is not timed)."""
        if self.seconds is None:
            return None
        return self.seconds + sum((self.disk_seconds or {}).values())

    def host_terms(self, layer: LayerCost) -> dict[str, int]:
        """The memory terms of `layer` held in host memory."""
        return {k: v for k, v in layer.memory.items() if self.device == "cpu" or k not in DEVICE_TERMS}

    def device_terms(self, layer: LayerCost) -> dict[str, int]:
        """The memory terms of `layer` held on the GPU (none on the CPU)."""
        return {k: v for k, v in layer.memory.items() if self.device != "cpu" and k in DEVICE_TERMS}

    @property
    def peak_layer(self) -> LayerCost:
        """The layer with the largest host footprint."""
        return max(self.layers, key=lambda layer: sum(self.host_terms(layer).values()))

    @property
    def peak_device_layer(self) -> LayerCost:
        return max(self.layers, key=lambda layer: sum(self.device_terms(layer).values()))

    @property
    def peak_host_bytes(self) -> int:
        return self.baseline_bytes + max(sum(self.host_terms(self.peak_layer).values()), self.final_bytes)

    @property
    def peak_device_bytes(self) -> int:
        return sum(self.device_terms(self.peak_device_layer).values())

    @property
    def disk_bytes(self) -> int:
        """The bundle, the resume copies of the hidden states (two while the next one is
        written, before the previous one is removed), and the largest export."""
        exports = [size for name, size in self.outputs.items() if name != "bundle"]
        return self.outputs["bundle"] + 2 * self.resume_bytes + max(exports, default=0)

    def to_dict(self) -> dict:
        peak, gpu = self.peak_layer, self.peak_device_layer
        return {"model": self.model, "device": self.device, "quantized_params": self.quantized_params,
                "quantized_tensors": self.quantized_tensors,
                "passthrough_bytes": self.passthrough_bytes, "passthrough_tensors": self.passthrough_tensors,
                "peak_host_bytes": self.peak_host_bytes, "baseline_bytes": self.baseline_bytes,
                "peak_layer": {"index": peak.index, **self.host_terms(peak)}, "final_bytes": self.final_bytes,
                "gpu_bytes": self.peak_device_bytes, "peak_gpu_layer": {"index": gpu.index, **self.device_terms(gpu)},
                "outputs": self.outputs, "disk_bytes": self.disk_bytes,
                "seconds": self.total_seconds, "compute_seconds": self.seconds, "disk_seconds": self.disk_seconds,
                "disk_io_bytes": self.disk_io, "rates": self.rates,
                "assumptions": self.assumptions, "notes": self.notes,
                "validation": None if self.validation is None else self.validation.to_dict(self.baseline_bytes)}


def layer_cost(table, config, index: int, calib: CalibSpec, spec: QuantizeSpec,
               device: str = "cpu", shares: list[float] | None = None) -> tuple[LayerCost, list[str], int]:
    """Memory terms and flops of layer `index` on `device` ("cpu" or "cuda"); also the names
    (relative to the layer) of its quantized tensors (not those keep_float leaves in float) and
    the number of 2-D matrices they hold (a fused expert tensor holds E). `shares`: an MoE
    layer's measured share of routed tokens per expert [E] (None: even routing)."""
    from maverick_quant.experts import experts_per_chunk

    plan = table.plan(config, index)
    hidden, tokens = config.hidden_size, calib.samples * calib.seq_len
    calibrated = spec.method is not Method.RTN
    prefix = table.prefix(index)
    dense = {name: plan.shapes[name + ".weight"] for name in plan.linears if not spec.keeps_float(prefix + name)}
    widest = max((s[1] for s in dense.values()), default=0)
    memory = {"layer": 2 * 4 * sum(math.prod(s) for n, s in plan.shapes.items() if not (plan.moe and n in plan.moe.fused_names))}
    names, count = [name + ".weight" for name in dense], len(dense)
    solved_dense = set(dense) if spec.method is not Method.AWQ else set()  # `awq` rounds them after its searches
    matmul, hessian_flops = gptq_passes(plan, config, calib, solved_dense, spec.true_sequential, table.attention,
                                        table.attention_output)
    solves = [(1, *dense[name]) for name in solved_dense]
    rounded = sum(math.prod(shape) for name, shape in dense.items() if name not in solved_dense)
    if calibrated:
        memory["cache"] = tokens * hidden * 4
        if plan.moe:
            memory["block_caches"] = 2 * tokens * hidden * 4
            memory["routing"] = tokens * plan.moe.num_experts * 4
        if solved_dense:  # `awq` rounds the dense linears: no Hessian
            memory["hessians"] = 3 * widest**2 * 4
        replays = spec.true_sequential and replay_starts(plan, solved_dense, table.attention,
                                                         table.attention_output) is not None
        if replays and (not plan.moe or device != "cpu"):  # kept for the later passes (attention_replay.py)
            memory["attention_outputs"] = tokens * plan.shapes[f"{table.attention_output}.weight"][1] * 4
        inter = max((s[0] for s in dense.values()), default=hidden)
        memory["activations"] = spec.batch_windows * calib.seq_len * max(3 * hidden, 2 * inter) * 4 * 2
    counts = None
    if plan.moe is not None:
        moe = plan.moe
        inter = config.intermediate_size
        expert_params = 3 * hidden * inter
        names, count = names + list(moe.fused_names), count + 3 * moe.num_experts
        routed = tokens * moe.top_k
        shared_first, shared_all = (sum(math.prod(plan.shapes[name + ".weight"]) for group in groups for name in group.linears)
                                    for groups in (moe.shared[:1], moe.shared))
        matmul += 2 * tokens * shared_all  # the shared expert's output
        if solved_dense:  # its down projection's Hessian pass (gate/up), and both Hessians
            matmul += 2 * tokens * shared_first
            hessian_flops += sum(2 * tokens * plan.shapes[group.linears[0] + ".weight"][1] ** 2 for group in moe.shared
                                 if set(group.linears) & solved_dense)
        counts = [routed * share for share in shares or [1 / moe.num_experts] * moe.num_experts]
        policies = expected_policies(counts, spec.rounding_moe, max(hidden, inter))
        sampled = min(tokens, all_token_sample_size(spec.moe, max(hidden, inter)))
        solved = sum(policy is not ExpertPolicy.RTN for policy in policies)  # `rtn` experts: rounded in closed form
        # rows a solved expert's Hessians read: its routed tokens, and under `mixed` the all-token sample too
        hessian_rows = sum(count for count, policy in zip(counts, policies) if policy is not ExpertPolicy.RTN)
        hessian_rows += sum(policy is ExpertPolicy.MIXED for policy in policies) * sampled
        hessian_flops += 2 * hessian_rows * (hidden**2 + inter**2)  # gate/up share one H, then down's
        matmul += 2 * hessian_rows * 2 * hidden * inter + 2 * routed * expert_params  # down's inputs; every output
        solves += [(2 * solved, inter, hidden), (solved, hidden, inter)]
        rounded += (moe.num_experts - solved) * expert_params
        per_chunk = experts_per_chunk(moe, hidden, inter, spec.moe.chunk_mib)
        hessians = hidden**2 + inter**2 if solved else 0  # none held when every expert is rounded
        per_expert = 12 * (expert_params + hessians) if calibrated else 2 * 4 * expert_params
        memory["experts"] = per_chunk * per_expert
        if calibrated:
            memory["expert_inputs"] = expert_input_bytes(counts, policies, hidden, inter, per_chunk, sampled)
        if device != "cpu":
            memory["expert_reads"] = per_chunk * expert_params * 2
    weights = sum(count * n * k for count, n, k in solves) + rounded
    cost = LayerCost(index, memory, float(matmul + hessian_flops if calibrated else 0), solves if calibrated else [], weights,
                     rounded_weights=rounded if calibrated else weights)
    if spec.method.searches_scales:
        awq = awq_layer_cost(plan, dense, config, calib, spec, counts)
        memory["awq_search"], cost.matmul_flops = awq.memory, cost.matmul_flops + awq.flops
        cost.awq_rounded, cost.expert_rereads = awq.rounded, awq.expert_rereads
    return cost, names, count


def expert_input_bytes(counts: list[float], policies: list[ExpertPolicy], hidden: int, inter: int, per_chunk: int,
                       sampled: int) -> int:
    """The `expert_inputs` term: routed inputs [n_e, D] of the busiest chunk of `per_chunk`
    consecutive experts (those solved: an `rtn` expert reads none) plus an all-token sample
    [T_s, D] for each of its `mixed` experts, and the three [n_hot, I] intermediates of the
    busiest solved expert (n_hot: its routed tokens, plus T_s under `mixed`: its down Hessian
    reads both at once); `counts` [E]: routed tokens per expert, `policies` [E]: theirs."""
    solved = [policy is not ExpertPolicy.RTN for policy in policies]
    rows = [count * is_solved + sampled * (policy is ExpertPolicy.MIXED)
            for count, policy, is_solved in zip(counts, policies, solved)]
    busiest = max(sum(rows[first : first + per_chunk]) for first in range(0, len(rows), per_chunk))
    hottest = max((row for row, is_solved in zip(rows, solved) if is_solved), default=0)
    return int(busiest * hidden * 4 + 3 * hottest * inter * 4)


def expert_shares(coverage: dict, path: Path) -> dict[int, list[float]]:
    """{MoE layer index: share of routed tokens per expert} from a `calibrate --coverage`
    coverage.json at `path` (InputError naming the file when it is not one)."""
    layers = coverage.get("layers") if isinstance(coverage, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise InputError(f"{path}: expected a coverage.json from `calibrate --coverage` (a 'layers' mapping of "
                         "tokens per expert)")
    shares = {}
    for layer, counts in layers.items():
        if not (layer.isdigit() and isinstance(counts, list) and counts and all(isinstance(c, int) for c in counts)):
            raise InputError(f"{path}: layers[{layer!r}]: expected a layer index and a list of token counts")
        total = sum(counts)
        shares[int(layer)] = [c / total if total else 1 / len(counts) for c in counts]
    return shares


def baseline_rss_bytes(table, config) -> int:
    """This process's resident size (VmRSS) once the model code is imported (a layer built on
    meta): what a quantize process holds before its first tensor. Run from a fresh process."""
    with torch.device("meta"):
        table.build_layer(table.text_config(config), 0)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    from maverick_quant.host_memory import peak_rss_mib

    return int(peak_rss_mib() * 2**20)  # where /proc is not: the peak so far, an upper bound


def tensor_bytes(model_dir: Path | None, table, config) -> tuple[dict[str, int], str]:
    """Bytes of every tensor (from the shard headers, or from config.json's shapes at bf16
    when the directory has no shards) and where the figures came from. Shards are checked
    against config.json as `quantize` checks them (`open_source`: names, shapes, dtypes), so a
    plan is never made of a checkpoint that quantize would refuse."""
    from maverick_quant.streaming import open_source

    if model_dir is not None and any(Path(model_dir).glob("*.safetensors")):
        checkpoint = open_source(model_dir).checkpoint
        return {name: math.prod(info.shape) * DTYPE_SIZES[info.dtype] for name, info in checkpoint.tensors.items()}, "headers"
    sizes = {name: 2 * math.prod(shape) for name, shape in table.expected_tensors(config).items()}
    vision = getattr(config, "vision_config", None)
    if vision is not None and table.passthrough_prefixes:
        per_layer = 4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size
        sizes["vision_model.* (estimate)"] = 2 * (vision.num_hidden_layers * per_layer
                                                + vision.vision_output_dim * table.text_config(config).hidden_size)
    return sizes, "config.json (bf16 assumed, vision tower estimated)"


def make_plan(name: str, table, config, sizes: dict[str, int], calib: CalibSpec, spec: QuantizeSpec,
              rates: dict | None, baseline: int, device: str = "cpu",
              shares: dict[int, list[float]] | None = None, disk: DiskRates | None = None,
              validation: ValidationSettings | None = None) -> Plan:
    """The plan of quantizing `config`'s model on `device` ("cpu" or "cuda"), timed with `rates`
    measured on that device (None: no time estimate); `shares`: measured routing per MoE layer
    (`expert_shares`; None: even); `disk`: measured disk rates (None: disk work not timed);
    `validation`: also plan validating the bundle against the model (plan_validation.py)."""
    _check_shares(table, config, shares or {})
    text = table.text_config(config)
    expected = table.expected_tensors(config)
    layers, params_by_grid, quantized_bytes, count, tensors, expert_params = [], {}, 0, 0, 0, 0
    packed_float: dict = {}  # {grid: (params, bytes)} written float by packed exports
    for index in range(text.num_hidden_layers):
        cost, names, matrices = layer_cost(table, text, index, calib, spec, device, (shares or {}).get(index))
        layers.append(cost)
        layer_plan = table.plan(text, index)
        for linear in names:
            tensor, weights = table.prefix(index) + linear, math.prod(expected[table.prefix(index) + linear])
            grid = spec.weights_for(tensor.removesuffix(".weight"))
            params_by_grid[grid] = params_by_grid.get(grid, 0) + weights
            expert_params += weights if layer_plan.moe and linear in layer_plan.moe.fused_names else 0
            quantized_bytes += sizes[tensor]
            if linear.removesuffix(".weight") in layer_plan.float_in_packed_exports:
                floated, float_bytes = packed_float.get(grid, (0, 0))
                packed_float[grid] = (floated + weights, float_bytes + sizes[tensor])
        count, tensors = count + matrices, tensors + len(names)
    params = sum(params_by_grid.values())
    passthrough = sum(sizes.values()) - quantized_bytes
    model_level = [table.embed, table.final_norm, table.lm_head]
    final = sum(size for tensor, size in sizes.items()
                if tensor in model_level or tensor.startswith(table.passthrough_prefixes))
    outputs = output_bytes(params_by_grid, spec.weights, passthrough, text.hidden_size, packed_float)
    assumptions = [f"{calib.samples} x {calib.seq_len} calibration tokens, batch {spec.batch_windows}, "
                   f"expert chunks of {spec.moe.chunk_mib} MiB", _rates_assumption(rates, device),
                   "quantize runs on the CPU: no GPU memory is used" if device == "cpu" else
                   "quantize runs on one GPU: layers, statistics, MoE block caches and expert chunks there, the hidden "
                   "states of the calibration windows in host memory; the CUDA context (~0.5 GiB) is not counted",
                   "routed tokens per expert as measured (--coverage)" if shares else
                   "routing taken as even: a hot expert's inputs grow with its share (give `calibrate --coverage`'s "
                   "coverage.json to --coverage)"]
    resume = calib.samples * calib.seq_len * text.hidden_size * 4 if spec.method is not Method.RTN else 0
    reread = sum(layer.expert_rereads for layer in layers) * quantized_bytes // max(params, 1)
    work = disk_work(sum(sizes.values()), outputs["bundle"], resume, len(layers), reread)
    if disk is not None:
        assumptions.append(_disk_assumption(disk, *work))
    checked = None
    if validation is not None:
        checked = plan_validation(table, text, validation, sum(sizes.values()), quantized_bytes / max(params, 1),
                                  outputs["bundle"], params, expert_params / max(params, 1), device, shares)
        time_validation(checked, rates, disk)
    from maverick_quant.pipeline import rank_deficient_note

    note = rank_deficient_note(table, text, spec, calib.samples * calib.seq_len)
    return Plan(name, params, count, passthrough, len(sizes) - tensors, baseline, layers, final, outputs,
                None if rates is None else planned_seconds(layers, rates, spec.weights.clip_search), resume, assumptions, device,
                dict(zip(("read", "write", "hash"), work)), disk.seconds(*work) if disk is not None else None, checked,
                rates, [note] if note else [])


def disk_work(checkpoint: int, bundle: int, resume: int, layers: int, reread: int = 0) -> tuple[int, int, int]:
    """(bytes read, written, hashed) by a run: the checkpoint is read once (and `reread` bytes of
    routed experts a second time: AWQ's block scale search); the bundle is written
    and hashed once, when written (the manifest keeps those hashes); the hidden states for
    `--resume` (`resume` bytes) are written after each of the `layers` layers but the last
    (bound to their layer by name, not hashed)."""
    return checkpoint + reread, bundle + (layers - 1) * resume, bundle


def _disk_assumption(disk: DiskRates, read: int, write: int, hashed: int) -> str:
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    return (f"disk work: reads {gb(read)}, writes {gb(write)} (bundle and the hidden states saved after every layer "
            f"but the last, for --resume), hashes {gb(hashed)} of bundle files (sha256); rates measured here: write {gb(disk.write)}/s fsync'ed, "
            f"uncached read {gb(disk.read)}/s, sha256 {gb(disk.hash)}/s ({disk.where})")


def _check_shares(table, config, shares: dict[int, list[float]]) -> None:
    """InputError unless every layer in `shares` is an MoE layer of `config` with as many experts."""
    text = table.text_config(config)
    for index, layer_shares in shares.items():
        moe = table.plan(text, index).moe if index < text.num_hidden_layers else None
        if moe is None or moe.num_experts != len(layer_shares):
            raise InputError(f"--coverage: layer {index} with {len(layer_shares)} experts is not an MoE layer of this "
                             "model with as many (was the coverage measured on another model?)")


def planned_seconds(layers: list[LayerCost], rates: dict, clip_search: bool = False) -> float:
    """The layers' matmul work at the measured matmul rate plus each GPTQ solve at the fitted cost,
    plus, under `clip_search`, the measured search time per weight for every quantized weight, plus
    every weight AWQ's searches round to nearest at the measured rounding rate, plus every weight
    quantized to nearest without a solve (RTN, `awq`, `rtn` experts) at the measured rate of that."""
    search = rates["clip_search_seconds_per_weight"] * sum(layer.quantized_weights for layer in layers) if clip_search else 0.0
    search += rates["rtn_seconds_per_weight"] * sum(layer.awq_rounded for layer in layers)
    search += rates["round_seconds_per_weight"] * sum(layer.rounded_weights for layer in layers)
    return search + sum(layer.matmul_flops for layer in layers) / rates["matmul_flops_per_s"] + sum(
        count * (k * rates["gptq_column_seconds"] + gptq_flops(n, k) / rates["gptq_flops_per_s"])
        for layer in layers for count, n, k in layer.gptq_solves)


def _rates_assumption(rates: dict | None, device: str) -> str:
    if rates is None:
        return f"time not estimated: no {device} device on this machine to measure (run `plan` where the job runs)"
    where = f"{rates['threads']} threads" if device == "cpu" else rates.get("device", device)
    when = f" {rates['measured_at']}" if rates.get("measured_at") else ""
    busy = f" under a load of {rates['load_per_core']:.1f} per core" if measured_busy(rates) else ""
    return (f"rates measured here{when}{busy}: fp32 matmul {rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, GPTQ solve "
            f"{rates['gptq_flops_per_s'] / 1e9:.1f} GFLOP/s + {1e3 * rates['gptq_column_seconds']:.2f} ms per column, "
            f"range search (clip_search) {1e9 * rates['clip_search_seconds_per_weight']:.1f} s per billion weights, "
            f"round to nearest {1e9 * rates['round_seconds_per_weight']:.1f} s per billion weights, on {where}")
