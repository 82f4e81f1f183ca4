"""Our calibration statistics as a llama.cpp importance matrix (imatrix GGUF).

For every linear that a GGUF export quantizes, llama.cpp's `llama-imatrix` stores the sum of
squares of its input over the calibration tokens and the token count:

    <gguf weight name>.in_sum2   F32 [n_mat, K]   sum_t x_t[k]^2   (n_mat = 1, or E for experts)
    <gguf weight name>.counts    F32 [n_mat, 1]   tokens seen (per expert for *_exps)
    general.type = "imatrix", imatrix.datasets [str], imatrix.chunk_count u32, imatrix.chunk_size u32

`llama-quantize --imatrix FILE` then weights each column's rounding error by in_sum2/counts.
We compute it on the float model streamed layer by layer over our calibration windows, with
Llama 4's routing: an expert's gate/up input is x * score over its routed tokens only, its
down input act(gate) * up of those; gate and up share their input, so their entries are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from maverick_quant.outputs import durable_replace, partial_name
from maverick_quant.recipe import MoESpec
from maverick_quant.streaming import StreamingModel, WeightSource


@dataclass
class SquareSums:
    """sum2 float64 [E, K] and counts int64 [E] of one linear's input (E = 1 for a dense linear)."""

    sum2: torch.Tensor
    counts: torch.Tensor

    @staticmethod
    def zeros(experts: int, width: int) -> "SquareSums":
        return SquareSums(torch.zeros(experts, width, dtype=torch.float64), torch.zeros(experts, dtype=torch.int64))

    def add(self, rows: torch.Tensor, matrix: int = 0) -> None:
        """Rows [..., K] of input seen by matrix `matrix`."""
        flat = rows.reshape(-1, rows.shape[-1])
        self.sum2[matrix] += flat.double().square().sum(0).to(self.sum2.device)  # rows may be on a GPU
        self.counts[matrix] += flat.shape[0]


@dataclass
class Imatrix:
    """{(layer, relative linear name): SquareSums}; routed experts are keyed "experts.gate_proj" etc."""

    entries: dict[tuple[int, str], SquareSums] = field(default_factory=dict)
    chunk_count: int = 0
    chunk_size: int = 0


def _hook_linears(layer: torch.nn.Module, names: tuple[str, ...], index: int, out: Imatrix) -> list:
    handles = []
    for name in names:
        module = layer.get_submodule(name)
        sums = out.entries.setdefault((index, name), SquareSums.zeros(1, module.in_features))
        handles.append(module.register_forward_pre_hook(lambda _m, args, sums=sums: sums.add(args[0].detach())))
    return handles


def _expert_observer(index: int, moe, config, out: Imatrix):
    """observe(expert, x_in, hidden) for routed_forward: gate/up see x_in, down sees hidden."""
    width, inter = config.hidden_size, config.intermediate_size
    sums = {name: out.entries.setdefault((index, f"experts.{name}"), SquareSums.zeros(moe.num_experts, k))
            for name, k in (("gate_proj", width), ("up_proj", width), ("down_proj", inter))}

    def observe(expert: int, x_in: torch.Tensor, hidden: torch.Tensor) -> None:
        sums["gate_proj"].add(x_in, expert)
        sums["up_proj"].add(x_in, expert)
        sums["down_proj"].add(hidden, expert)

    return observe


@torch.no_grad()
def collect_imatrix(source: WeightSource, input_ids: torch.Tensor, batch: int = 8,
                    chunk_mib: int = MoESpec.chunk_mib, show_progress: bool = True,
                    device: torch.device | str = "cpu", state=None) -> Imatrix:
    """Square sums of every quantizable linear's input over windows `input_ids` [S, L] (layers
    on `device`, hidden states on the host). `state` (resume.RunState): keep each layer's sums
    and the hidden states after it, and go on from an earlier attempt's (walk.py)."""
    from maverick_quant.devices import device_label
    from maverick_quant.experts import check_expert_budget, run_moe_layer
    from maverick_quant.walk import walk_layers

    model = StreamingModel(source, batch=batch, device=device)
    check_expert_budget(model, chunk_mib)
    out = Imatrix(chunk_count=int(input_ids.shape[0]), chunk_size=int(input_ids.shape[1]))

    def step(index: int, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        plan = model.plan(index)
        tensors = None if plan.moe is None else source.layer_tensors(index, experts=False)
        layer = model.layer(index, tensors)
        gathered = Imatrix()
        handles = _hook_linears(layer, plan.linears, index, gathered)
        try:
            if plan.moe is None:
                model.run_layer(layer, hidden, out=hidden)
            else:
                run_moe_layer(model, index, layer, hidden, chunk_mib,
                              observe=_expert_observer(index, plan.moe, model.config, gathered))
        finally:
            for handle in handles:
                handle.remove()
        return layer_sums_tensors(gathered)

    for index, results in walk_layers(model.num_layers, model.embed(input_ids), step, state, "imatrix layers",
                                      show_progress, device_label(model.device)):
        out.entries.update(layer_sums(index, results))
    return out


def layer_sums_tensors(imatrix: Imatrix) -> dict[str, torch.Tensor]:
    """One layer's entries as tensors {"<linear>.sum2": fp64 [E, K], "<linear>.counts": int64 [E]}."""
    return {f"{name}.{part}": getattr(sums, part) for (_, name), sums in imatrix.entries.items()
            for part in ("sum2", "counts")}


def layer_sums(index: int, tensors: dict[str, torch.Tensor]) -> dict[tuple[int, str], SquareSums]:
    """Inverse of `layer_sums_tensors` for layer `index`."""
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {(index, name): SquareSums(tensors[f"{name}.sum2"], tensors[f"{name}.counts"]) for name in names}


def imatrix_tensors(imatrix: Imatrix) -> dict[str, np.ndarray]:
    """{"<gguf weight>.in_sum2": F32 [n_mat, K], "<gguf weight>.counts": F32 [n_mat, 1]}, sorted by name."""
    from maverick_quant.exporters.gguf import EXPERT_NAMES, LAYER_NAMES

    tensors = {}
    for (index, name), sums in imatrix.entries.items():
        if name.startswith("experts."):
            gguf_name = EXPERT_NAMES[name.removeprefix("experts.")]
        else:
            gguf_name = LAYER_NAMES[name]
        key = f"blk.{index}.{gguf_name}.weight"
        tensors[f"{key}.in_sum2"] = sums.sum2.float().numpy()
        tensors[f"{key}.counts"] = sums.counts.float().numpy()[:, None]
    return dict(sorted(tensors.items()))


def write_imatrix_gguf(imatrix: Imatrix, out_path: Path, datasets: list[str]) -> None:
    """The imatrix GGUF at `out_path`, written under a temporary name and renamed when complete."""
    import gguf

    out_path = Path(out_path)
    tmp = partial_name(out_path)
    writer = gguf.GGUFWriter(path=str(tmp), arch="imatrix")
    try:
        writer.add_string("general.type", "imatrix")
        writer.add_array("imatrix.datasets", list(datasets))
        writer.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
        writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
        for name, array in imatrix_tensors(imatrix).items():
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        durable_replace(tmp, out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
