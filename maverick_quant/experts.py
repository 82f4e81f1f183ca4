"""Quantize the mixture-of-experts block of one decoder layer, streaming experts in chunks.

Flow for an MoE layer whose attention is already quantized (see pipeline.py):

1. One pass of the layer captures the residual stream before the block, h [S, L, D]
   (written over the caller's hidden states), and the block's input x = norm(h).
2. Shared expert: gate/up against H = E[x x^T], then down against its quantized hidden.
   The router stays in float unless `moe.quantize_router` (then solved on the same H).
3. Routing with the (final) router, exactly as Llama 4: top-k, sigmoid score on the input.
4. Routed experts, `chunk` at a time, read as slices of the fused tensors: each expert's
   gate/up are solved on its own routed inputs x * score (policy-dependent Hessian, see
   MoESpec), then down on act(gate) * up of the QUANTIZED gate/up; all experts of a chunk
   are solved as one batch W [E_c, N, K], H [E_c, K, K] (expert_solve.py). The chunk's quantized outputs are
   accumulated and the chunk is written to the bundle before the next one is read.
5. The layer output h + shared(x) + routed(x) becomes the next layer's input.

Peak memory: three activation caches (h, x, routed output), one layer without its experts,
one chunk of experts with their Hessians.
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from maverick_quant.arch.base import LinearGroup, MoEBlock, unfuse_experts
from maverick_quant.awq_moe import apply_block_scale, clip_shared, scale_expert_chunk, scale_shared_down, search_block_scale
from maverick_quant.calibration.capture import capture_inputs
from maverick_quant.calibration.moe import Routing, activation, mean_outer, route, routed_forward
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.devices import quantized_to
from maverick_quant.errors import InputError
from maverick_quant.expert_solve import quantize_expert_chunk, rtn_expert_chunk
from maverick_quant.groups import solve_group
from maverick_quant.recipe import Method, MoESpec, QuantizeSpec, QuantSpec
from maverick_quant.streaming import StopForward, StreamingModel


@dataclasses.dataclass
class ExpertChunks:
    """Where layer `index`'s routed-expert chunks go: the bundle writer, and in a resumable run
    (`state`) one record per finished chunk, so that a run resumed in the middle of this layer
    reads the chunks already on disk instead of solving them again.

    writer: BundleWriter; state: RunState or None; prefix: the experts' module path + ".";
    grid: the bundle's QuantSpec (bits and group size to decode a chunk read back);
    parallel: ExpertParallel (distributed.py) splitting the chunks across processes, or None;
    show_progress: a bar of the layer's experts (with a rate) under the run's bar of layers.
    """

    writer: object
    state: object
    index: int
    prefix: str
    grid: QuantSpec
    parallel: object = None
    show_progress: bool = False

    def solved(self, chunk_list: list[tuple[int, int]], solve):
        """Yield (first, quantized experts, file record, audit) for each chunk (first, count) of
        `chunk_list`, in order. Each chunk is solved once: read back from an earlier attempt,
        or solved here by `solve(first, count) -> (quantized, audit)`, or, under expert
        parallelism, solved by the rank that owns it (chunk c: rank c mod N, one round of N
        chunks at a time) and received. A chunk is stored before it is yielded."""
        world = self.parallel.world if self.parallel is not None else 1
        with tqdm(total=sum(count for _, count in chunk_list), desc=f"layer {self.index} experts", unit="expert",
                  leave=False, disable=not self.show_progress) as bar:
            for start in range(0, len(chunk_list), world):
                round_chunks = list(enumerate(chunk_list[start : start + world], start))
                local = {}
                for number, (first, count) in round_chunks:
                    if self._owns(number):
                        local[first] = self.finished(first) or self._solve_to_host(solve, first, count)
                for number, (first, _) in round_chunks:
                    quantized, audit, record = local.pop(first, (None, None, None))
                    if self.parallel is not None:
                        quantized, audit = self.parallel.share(self.parallel.owner(number), quantized, audit,
                                                               self.grid.bits, self.grid.group_size)
                    if record is None:
                        record = self.write(first, quantized, audit)
                    bar.update(len(audit))
                    yield first, quantized, record, audit

    @staticmethod
    def _solve_to_host(solve, first: int, count: int) -> tuple[dict[str, QuantizedWeight], list[dict], None]:
        """`solve` a chunk on the compute device and bring its weights to the host, where they are
        written and shared between ranks (no record yet: it is written next)."""
        quantized, audit = solve(first, count)
        return quantized_to(quantized, "cpu"), audit, None

    def _owns(self, chunk_number: int) -> bool:
        return self.parallel is None or self.parallel.owner(chunk_number) == self.parallel.rank

    def write(self, first: int, quantized: dict[str, QuantizedWeight], audit: list[dict]) -> dict:
        """Store the chunk starting at expert `first`; returns its file record."""
        record = self.writer.write_experts(self.index, self.prefix, first, quantized)
        if self.state is not None:
            self.state.save_chunk(self.index, first, record, audit)
        return record

    def finished(self, first: int) -> tuple[dict[str, QuantizedWeight], list[dict], dict] | None:
        """(quantized experts, audit, file record) of a chunk an earlier attempt finished, or
        None (always on ranks that do not write: the chunk files are rank 0's)."""
        writes = self.parallel is None or self.parallel.writes
        saved = self.state.load_chunk(self.index, first) if self.state is not None and writes else None
        if saved is None:
            return None
        record, audit = saved
        quantized = self.writer.read_experts(record, self.grid.bits, self.grid.group_size)
        return None if quantized is None else (quantized, audit, record)


def capture_block_io(model: StreamingModel, layer: torch.nn.Module, moe: MoEBlock,
                     hidden: torch.Tensor) -> torch.Tensor:
    """Run `layer` up to its MoE block over every window: overwrite `hidden` [S, L, D] with
    the residual stream entering the block, return the block's input x [S*L, D] (on the
    model's device, where the whole block is computed)."""
    x = torch.empty(hidden.shape, dtype=hidden.dtype, device=model.device)
    residual_module, block = layer.get_submodule(moe.residual_input), layer.get_submodule(moe.block)
    seen = {}
    handles = [residual_module.register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0].detach())),
               block.register_forward_pre_hook(lambda _m, args: _stop_with(seen, "x", args[0].detach()))]
    try:
        for start in range(0, hidden.shape[0], model.batch):
            try:
                rows = slice(start, start + model.batch)
                model.apply(layer, hidden[rows], rows)
            except StopForward:
                pass
            span = slice(start, start + seen["x"].shape[0])
            hidden[span], x[span] = seen.pop("h"), seen.pop("x")
    finally:
        for handle in handles:
            handle.remove()
    return x.reshape(-1, x.shape[-1])


def _stop_with(store: dict, key: str, value: torch.Tensor) -> None:
    store[key] = value
    raise StopForward


def _feed_module(module: torch.nn.Module, x: torch.Tensor, batch_tokens: int = 8192) -> None:
    """Run `module` over rows of x [T, D] for its hooks' sake (a hook may stop each batch)."""
    for start in range(0, x.shape[0], batch_tokens):
        try:
            module(x[start : start + batch_tokens])
        except StopForward:
            pass


@torch.no_grad()
def _module_output(module: torch.nn.Module, x: torch.Tensor, batch_tokens: int = 8192) -> torch.Tensor:
    """module(x) for x [T, D] -> [T, N], computed `batch_tokens` rows at a time into one
    output (bounded intermediates; no list of pieces beside the result)."""
    out = None
    for start in range(0, x.shape[0], batch_tokens):
        y = module(x[start : start + batch_tokens])
        if out is None:
            out = torch.empty((x.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device)
        out[start : start + y.shape[0]] = y
    return out


def add_block_output(hidden: torch.Tensor, out: torch.Tensor) -> None:
    """hidden [S, L, D] (host) += out [S*L, D] (the block's output, on the device), one window
    at a time so that no host copy of the whole output is made."""
    windows = out.view_as(hidden)
    for row in range(hidden.shape[0]):
        hidden[row] += windows[row].to(hidden.device)


def quantize_shared(layer: torch.nn.Module, moe: MoEBlock, x: torch.Tensor,
                    spec: QuantizeSpec) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    """GPTQ the shared expert (and the router if asked): the input group against E[x x^T],
    the down projection against the quantized shared hidden act(gate) * up."""
    first, rest = moe.shared[0], moe.shared[1:]
    if spec.moe.quantize_router:
        first = LinearGroup(first.name, (moe.router, *first.linears))
    rtn = spec.method is Method.AWQ  # round to nearest: GPTQ with H = I (None), in closed form
    quantized, stats = solve_group(layer, first, None if rtn else mean_outer(x, x.shape[1]), x.shape[0], spec)
    shared = layer.get_submodule(moe.shared_module)
    for group in rest:
        if rtn:  # no statistics needed
            group_quantized, group_stats = solve_group(layer, group, None, x.shape[0], spec)
        else:
            with capture_inputs(layer, (group.linears[0],), stop=True) as accumulators:
                _feed_module(shared, x)
            acc = accumulators[group.linears[0]]
            group_quantized, group_stats = solve_group(layer, group, acc.hessian(), acc.tokens, spec)
        quantized.update(group_quantized)
        stats.update(group_stats)
    return quantized, stats


def experts_per_chunk(moe: MoEBlock, hidden: int, inter: int, budget_mib: int) -> int:
    """Experts solved together within `budget_mib`: per expert, fp32 weights (gate, up, down)
    and Hessians (D x D, I x I), about three copies of each live during a GPTQ solve
    (Maverick: about 2.6 GB per expert). InputError when one expert does not fit."""
    per_expert = 4 * 3 * (3 * hidden * inter + hidden * hidden + inter * inter)
    if per_expert > budget_mib * 2**20:
        raise InputError(f"--moe-chunk-mib {budget_mib}: one expert needs about {per_expert / 2**20:.0f} MiB "
                         "(fp32 weights, Hessians and GPTQ workspace); raise the budget")
    return min(moe.num_experts, budget_mib * 2**20 // per_expert)


def dequantized_experts(quantized: dict[str, QuantizedWeight], device: torch.device) -> dict[str, torch.Tensor]:
    """Float weights {name: [E_c, N, K]} of a chunk of quantized experts, on `device`."""
    return {name: weight.dequantize() for name, weight in quantized_to(quantized, device).items()}


def read_experts(model: StreamingModel, index: int, first: int, count: int) -> dict[str, torch.Tensor]:
    """Unfused weights {name: [count, N, K]} of routed experts [first, first + count) of MoE
    layer `index`, read from the source and moved to the model's device (in their stored dtype)."""
    moe = model.plan(index).moe
    fused = model.expert_tensors(index, first, count)
    return {name: weight.to(model.device) for name, weight in unfuse_experts(moe, fused).items()}


def check_expert_budget(model: StreamingModel, chunk_mib: int) -> None:
    """InputError before any work when one routed expert of `model` does not fit `chunk_mib`
    (`experts_per_chunk`): found in the first MoE layer otherwise, after the layers before it."""
    first_moe = next((index for index in range(model.num_layers) if model.plan(index).moe is not None), None)
    if first_moe is not None:
        experts_per_chunk(model.plan(first_moe).moe, model.config.hidden_size, model.config.intermediate_size, chunk_mib)


def expert_chunks(moe: MoEBlock, config, chunk_mib: int):
    """(first, count) of each chunk of experts within the memory budget `chunk_mib`."""
    step = experts_per_chunk(moe, config.hidden_size, config.intermediate_size, chunk_mib)
    for first in range(0, moe.num_experts, step):
        yield first, min(step, moe.num_experts - first)


@torch.no_grad()
def quantize_moe_block(model: StreamingModel, index: int, layer: torch.nn.Module, hidden: torch.Tensor,
                       spec: QuantizeSpec, store: ExpertChunks,
                       x: torch.Tensor | None = None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize layer `index`'s MoE block and advance `hidden` to the layer's output.

    `x`: the block's input [S*L, D] when the caller ran `capture_block_io` already (`hidden`
    then holds the residual stream entering the block); None to run it here.
    `store` keeps each chunk of experts (and gives back the chunks a killed attempt finished).
    Returns the shared expert's (and router's) quantized weights and the block's stats:
    {"experts": {"chunks": [...], "audit": [...]}, <shared linear>: {...}}.
    """
    moe = model.plan(index).moe
    x = capture_block_io(model, layer, moe, hidden) if x is None else x
    awq = spec.method.searches_scales
    awq_stats, block_scales = ({}, None) if not awq else scale_block(model, index, layer, x, spec)
    scale_spec = spec  # AWQ's per-expert search follows the user's policy and fallback
    spec = dataclasses.replace(spec, moe=spec.rounding_moe)  # `awq` then rounds every expert to nearest
    quantized, stats = quantize_shared(layer, moe, x, spec)
    routing = route(x, layer.get_submodule(moe.router).weight, moe.top_k)
    out = _module_output(layer.get_submodule(moe.shared_module), x)  # the block's output starts with the shared expert
    def solve(first: int, count: int) -> tuple[dict[str, QuantizedWeight], list[dict]]:
        weights = {k: v.float() for k, v in read_experts(model, index, first, count).items()}
        awq_records = [{} for _ in range(count)]
        if awq:
            weights, awq_records = scale_expert_chunk(x, routing, moe, weights, first, block_scales, scale_spec)
        chunk_quantized, records = quantize_expert_chunk(x, routing, moe, weights, first, spec)
        return chunk_quantized, [{**record, **extra} for record, extra in zip(records, awq_records)]

    chunks, audit = [], []
    for first, chunk_quantized, record, records in store.solved(list(expert_chunks(moe, model.config, spec.moe.chunk_mib)),
                                                                 solve):
        routed_forward(x, routing, dequantized_experts(chunk_quantized, x.device), activation(moe.activation), first, out=out)
        chunks.append(record)
        audit.extend(records)
    add_block_output(hidden, out)
    return quantized, {**stats, **awq_stats, "experts": {"chunks": chunks, "audit": audit}}


def scale_block(model: StreamingModel, index: int, layer: torch.nn.Module, x: torch.Tensor,
                spec: QuantizeSpec) -> tuple[dict, torch.Tensor]:
    """AWQ's block-wide input scale (searched on the float block with float routing) folded
    into the layer, x rescaled in place to match, the shared expert's up -> down scale, and
    (awq.clip) the shared expert's clipping. Returns (stats, the block scale the stored norm
    realised, s' [D]: `apply_block_scale`), which the routed experts take.

    x [T, D] becomes x / s', the block input the shipped norm computes (its output is linear
    in its weight), as the dense path gets by running the layer again."""
    moe = model.plan(index).moe
    routing = route(x, layer.get_submodule(moe.router).weight, moe.top_k)
    block = search_block_scale(model, index, layer, x, routing, spec)
    realised = apply_block_scale(layer, moe, block.scales)
    x /= realised.to(x.dtype)
    shared = scale_shared_down(layer, moe, x, spec)
    if spec.awq.clip:
        clip_shared(layer, moe, x, spec)
    stats = {f"awq:{moe.residual_input}": {"ratio": block.ratio, "rtn_loss": block.rtn_loss, "loss": float(block.losses.min())},
             f"awq:{moe.shared_module}.up_proj": {"ratio": shared.ratio, "rtn_loss": shared.rtn_loss,
                                                   "loss": float(shared.losses.min())}}
    return stats, realised


@torch.no_grad()
def start_moe_block(model: StreamingModel, layer: torch.nn.Module, moe: MoEBlock,
                    hidden: torch.Tensor) -> tuple[torch.Tensor, Routing, torch.Tensor]:
    """Run `layer` up to its MoE block over `hidden` [S, L, D] (overwritten with the residual
    stream entering the block) and begin the block: (its input x [S*L, D], the routing of x,
    the shared expert's output [S*L, D], to which the routed experts' outputs are then added)."""
    x = capture_block_io(model, layer, moe, hidden)
    return (x, route(x, layer.get_submodule(moe.router).weight, moe.top_k),
            _module_output(layer.get_submodule(moe.shared_module), x))


@torch.no_grad()
def run_moe_layer(model: StreamingModel, index: int, layer: torch.nn.Module, hidden: torch.Tensor,
                  chunk_mib: int = MoESpec.chunk_mib, observe=None) -> Routing:
    """Float forward of MoE layer `index` over `hidden` [S, L, D] in place, reading routed
    experts chunk by chunk from the source (never all of them); returns the routing.
    `observe` sees each expert's inputs (see `routed_forward`)."""
    return run_moe_blocks(model, index, layer, [(model.layout, hidden)], chunk_mib, observe)[0]


@torch.no_grad()
def run_moe_blocks(model: StreamingModel, index: int, layer: torch.nn.Module, blocks: list, chunk_mib: int,
                   observe=None) -> list[Routing]:
    """`run_moe_layer` over several caches, blocks = [(packed layout or None, hidden [S_b, L_b, D])],
    each chunk of experts read once for all of them; returns each block's routing.

    Memory: each block's input x and output [S_b * L_b, D] at once, and one chunk of experts."""
    moe = model.plan(index).moe
    states = []
    for layout, hidden in blocks:
        model.layout = layout
        states.append(start_moe_block(model, layer, moe, hidden))
    for first, count in expert_chunks(moe, model.config, chunk_mib):
        weights = {k: v.to(model.dtype) for k, v in read_experts(model, index, first, count).items()}
        for x, routing, out in states:
            routed_forward(x, routing, weights, activation(moe.activation), first, out=out, observe=observe)
    for (_, hidden), (_, _, out) in zip(blocks, states):
        add_block_output(hidden, out)
    return [routing for _, routing, _ in states]


@torch.no_grad()
def rtn_moe_block(model: StreamingModel, index: int, spec: QuantizeSpec, store: ExpertChunks) -> dict:
    """RTN every routed expert of layer `index`, chunk by chunk; returns the block's stats."""
    moe = model.plan(index).moe
    def solve(first: int, count: int) -> tuple[dict[str, QuantizedWeight], list[dict]]:
        return rtn_expert_chunk(moe, read_experts(model, index, first, count), first, spec)

    chunks, audit = [], []
    for _, _, record, records in store.solved(list(expert_chunks(moe, model.config, spec.moe.chunk_mib)), solve):
        chunks.append(record)
        audit.extend(records)
    return {"experts": {"chunks": chunks, "audit": audit}}
