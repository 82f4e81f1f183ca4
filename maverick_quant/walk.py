"""Resumable forward-only walks over a model's layers: `imatrix` and `calibrate --coverage`.

Both stream the float model over the calibration windows, layer by layer, and gather
something per layer (square sums of every linear's input; tokens per expert). For Maverick
that is one float forward over 48 layers, hours on a GPU: a crash must not throw it away.
After each layer the run keeps, in its state folder `.NAME.resume` beside the output
(resume.resumable_output_dir):

    results/layer-NNNNN.safetensors   what the layer gathered (written first)
    hidden-NNNNN.safetensors          the hidden states entering the next layer
    progress.json                     {"next_layer": i, ...}, written last (resume.RunState)

A run started again with --resume and the same inputs (run.json) reads the finished layers'
results back and goes on from the saved hidden states; the output is the same, bit for bit,
as an uninterrupted run's (every step is deterministic for a given machine and thread count;
resuming on another device warns, as quantize does).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from maverick_quant.errors import kept_when_refused
from maverick_quant.resume import RunState, warn_if_resumed_elsewhere
from maverick_quant.streaming import require_finite_hidden


def walk_layers(layers: int, hidden: torch.Tensor, step: Callable[[int, torch.Tensor], dict[str, torch.Tensor]],
                state: RunState | None, desc: str, show_progress: bool = True,
                device: str | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield (index, results) for layers 0 .. `layers` - 1, in order.

    step(index, hidden) runs layer `index` over `hidden` [S, L, D] (advancing it in place to
    the layer's output) and returns what it gathered, {name: tensor}. Layers an earlier
    attempt of this run finished (`state`) are not run: their results are read back and the
    walk goes on from the hidden states saved after the last of them. With a state, each
    layer's results, then the hidden states entering the next layer, then the progress
    record are written before the layer's results are yielded (no hidden states after the last).
    Hidden states that turn NaN/Inf, and bad model content found inside a layer, raise
    ContentError naming the layer (the finished layers kept for --resume: `errors.kept_when_refused`).
    `device` (devices.device_label) is recorded with the progress; resuming on another one warns.
    """
    warn_if_resumed_elsewhere(state, device)
    start, saved = state.load_progress(state.finished_results()) if state is not None else (0, None)
    for index in range(min(start, layers)):
        yield index, state.layer_results(index)
    if saved is not None:
        hidden.copy_(saved)
    with tqdm(total=layers, initial=min(start, layers), desc=desc, unit="layer", disable=not show_progress) as bar:
        for index in range(start, layers):
            with kept_when_refused(index):
                results = step(index, hidden)
                require_finite_hidden(hidden, index, "the")  # else what the later layers gather is NaN
            if state is not None:
                state.save_layer_results(index, results)
                state.save_progress(index + 1, hidden if index + 1 < layers else None, device)
            bar.update()
            yield index, results
