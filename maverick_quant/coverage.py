"""Routing coverage: how many calibration tokens the float model routes to each expert.

Run before a long quantize job (`calibrate --coverage`) so starved experts are seen up
front. It is an estimate: quantize routes each layer on the hidden states of the layers it
has already quantized (and, under AWQ, through the rescaled router), so a bundle's audit.json
records the counts each expert was actually calibrated on, which may differ by a few tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from maverick_quant.outputs import write_json_atomic
from maverick_quant.errors import InputError
from maverick_quant.experts import run_moe_layer
from maverick_quant.streaming import StreamingModel, WeightSource

COVERAGE_JSON, COVERAGE_PNG = "coverage.json", "coverage.png"


@torch.no_grad()
def expert_coverage(source: WeightSource, input_ids: torch.Tensor, batch: int = 8,
                    show_progress: bool = True, device: torch.device | str = "cpu", state=None) -> dict:
    """Stream the float model over `input_ids` [S, L] (layers on `device`, hidden states on the
    host); tokens routed to each expert per MoE layer. `state` (resume.RunState): keep each
    layer's counts and the hidden states after it, and go on from an earlier attempt's (walk.py).

    Returns {"tokens": S*L, "layers": {layer: [count per expert]}, "starved": {layer: [experts with 0]}}.
    """
    from maverick_quant.devices import device_label
    from maverick_quant.walk import walk_layers

    model = StreamingModel(source, batch=batch, device=device)
    moe_layers = [i for i in range(model.num_layers) if model.plan(i).moe is not None]
    if not moe_layers:
        raise InputError("--coverage: this model has no mixture-of-experts layers")

    def step(index: int, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        if index not in moe_layers:
            model.run_layer(model.layer(index), hidden, out=hidden)
            return {}
        layer = model.layer(index, source.layer_tensors(index, experts=False))
        return {"counts": run_moe_layer(model, index, layer, hidden).counts.cpu()}

    counts = {index: results["counts"].tolist()
              for index, results in walk_layers(moe_layers[-1] + 1, model.embed(input_ids), step, state,
                                                "coverage layers", show_progress, device_label(model.device))
              if "counts" in results}
    return {"tokens": int(input_ids.numel()), "layers": counts,
            "starved": {index: [e for e, n in enumerate(c) if n == 0] for index, c in counts.items()}}


def write_coverage(coverage: dict, out_dir: Path) -> list[Path]:
    """coverage.json and a heat map coverage.png in `out_dir`."""
    from maverick_quant.validation.report import plot_expert_tokens

    out_dir = Path(out_dir)
    write_json_atomic(out_dir / COVERAGE_JSON, coverage)
    title = f"Calibration tokens per expert ({coverage['tokens']} tokens)"
    return [out_dir / COVERAGE_JSON, plot_expert_tokens(coverage["layers"], out_dir / COVERAGE_PNG, title)]


def coverage_summary(coverage: dict) -> str:
    """One line per MoE layer: min / median / max tokens per expert and starved experts."""
    lines = []
    for index, counts in coverage["layers"].items():
        ordered = sorted(counts)
        starved = coverage["starved"][index]
        lines.append(f"layer {index}: tokens per expert min {ordered[0]}, median {ordered[len(ordered) // 2]}, "
                     f"max {ordered[-1]}; starved: {starved if starved else 'none'}")
    return "\n".join(lines)
