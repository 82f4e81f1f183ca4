"""Keep a layer's attention outputs once its attention is final, instead of recomputing them.

True-sequential GPTQ runs a layer once per linear group, each pass up to the group's input
(groups.group_hessian), and once more for the layer's output. A Llama layer's groups are q/k,
v, o (the attention's), gate/up and down (the MLP's), so after o is solved the passes for
gate/up, for down and for the output each compute the same attention again: the projections,
the rotary embedding and softmax(QK^T)V, the most expensive part of a pass at 512+ tokens.

`AttentionReplay` keeps the attention module's output [S, L, D] (S windows of L tokens, D
hidden) from the first of those passes (`recording`) and serves it to the later ones
(`replaying`) in place of the module's forward: the same tensors the module would compute
again, so the results are the same bit for bit. Passes go through the windows in order, a
batch of B at a time (StreamingModel.feed_layer / run_layer), so the b-th call of a pass gets
rows [cursor, cursor + B) and the cursor must reach S at the end of every pass.

Cost: one more host tensor the size of the hidden-state cache, for the dense layers' MLP groups.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class AttentionReplay:
    """The outputs of `module` (a decoder layer's attention, returning (output [B, L, D],
    weights)) over all `windows` calibration windows, recorded in one pass and replayed in
    the next ones."""

    def __init__(self, module: torch.nn.Module, windows: int):
        self.module, self.windows = module, windows
        self.outputs: torch.Tensor | None = None  # [S, L, D] on the host, once a pass recorded every window
        self._cursor = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Within the block, every output of the module is kept, in window order; kept for
        replay only when the pass saw all windows (else the block leaves nothing behind)."""
        kept: dict[str, torch.Tensor] = {}
        self._cursor = 0

        def keep(_module, _args, out) -> None:
            batch = out[0].detach()
            if "outputs" not in kept:
                kept["outputs"] = torch.empty((self.windows, *batch.shape[1:]), dtype=batch.dtype)
            kept["outputs"][self._cursor : self._cursor + batch.shape[0]] = batch
            self._cursor += batch.shape[0]

        handle = self.module.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()
        if self._cursor == self.windows:
            self.outputs = kept["outputs"]

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Within the block, the module's forward returns the recorded outputs of the next
        windows (as many as its input holds) without computing anything. RuntimeError when a
        pass does not go through exactly the recorded windows."""
        if self.outputs is None:
            raise RuntimeError("no attention outputs were recorded to replay")
        self._cursor = 0

        def recorded(hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
            first, count = self._cursor, hidden_states.shape[0]
            if first + count > self.windows:
                raise RuntimeError(f"attention replay: a pass asked for windows {first}..{first + count - 1} of "
                                   f"{self.windows} recorded")
            self._cursor += count
            return self.outputs[first : first + count].to(hidden_states.device), None

        self.module.forward = recorded
        try:
            yield
        finally:
            del self.module.forward  # back to the class's forward
        if self._cursor != self.windows:
            raise RuntimeError(f"attention replay: a pass went through {self._cursor} of the {self.windows} "
                               "recorded windows")

    def around_pass(self) -> contextlib.AbstractContextManager:
        """`replaying` once a pass recorded the outputs, else `recording`."""
        return self.recording() if self.outputs is None else self.replaying()
