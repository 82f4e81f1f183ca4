"""Keep a layer's attention once its q/k/v are final, instead of recomputing it in every pass.

True-sequential GPTQ runs a layer once per linear group, each pass up to the group's input
(groups.group_hessian), and once more for the layer's output. A Llama layer's groups are q/k,
v, o (the attention's), gate/up and down (the MLP's); once v is solved, the attention before
its output projection o no longer changes, yet the passes for o, gate/up and down and the
output pass each compute it again: the q/k/v projections, the rotary embedding and
softmax(QK^T)V, the most expensive part of a pass at 512+ tokens. An MoE layer's pass to its
block (experts.capture_block_io) does the same after o.

`AttentionReplay` keeps the input of the output projection, A [S, L, H*hd] (S windows of L
tokens), from the first of those passes (`recording`: o's own, whose pass stops right at that
input) and serves the later ones (`replaying`): the attention module's forward is replaced by
o(A) for the windows at hand, with o's weights as they are then (quantized once o is solved).
These are the tensors the module would compute again, so the results are the same bit for bit.
Passes go through the windows in order, a batch at a time (StreamingModel.feed_layer /
run_layer), so a pass's b-th call gets the rows after those of its earlier calls, and every
replayed pass must go through all S windows.

A replayed pass runs nothing inside the attention before the projection, so it must not need
those modules' hooks: AWQ's clip pass samples q_proj's input and is not replayed (awq_layer.py
does not replay; its one pass that could, down's search, is not worth the coupling).

Cost: one more host tensor the size of the hidden-state cache while the layer is solved.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def in_attention_core(name: str, attention: str, attention_output: str) -> bool:
    """Whether the linear (or norm) `name` of a layer is computed inside the `attention` module
    before its output projection `attention_output`: while such a tensor changes, the kept
    inputs of the projection go stale."""
    return name.startswith(f"{attention}.") and name != attention_output


def last_core_group(groups, attention: str, attention_output: str) -> int:
    """The index in `groups` (LinearGroups, in the layer's order) of the last group computed
    inside the attention before its output projection (`in_attention_core`), -1 if none: the
    passes of the groups after it can keep, then replay, the projection's inputs."""
    return max((index for index, group in enumerate(groups)
                if in_attention_core(group.linears[0], attention, attention_output)), default=-1)


class AttentionReplay:
    """The inputs of `projection` (the attention's output projection, inside `attention`,
    which returns (projection's output [B, L, D], weights)) over all `windows` calibration
    windows, kept in one pass and replayed through `projection` in the next ones."""

    def __init__(self, attention: torch.nn.Module, projection: torch.nn.Module, windows: int):
        self.attention, self.projection, self.windows = attention, projection, windows
        self.inputs: torch.Tensor | None = None  # [S, L, H*hd] on the host, once a pass kept every window
        self._cursor = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Within the block, every input of the projection is kept, in window order (its hook
        runs before any other, so a hook that stops the pass there comes after it); kept for
        replay only when the pass saw all windows."""
        kept: dict[str, torch.Tensor] = {}
        self._cursor = 0

        def keep(_module, args) -> None:
            batch = args[0].detach()
            if "inputs" not in kept:
                kept["inputs"] = torch.empty((self.windows, *batch.shape[1:]), dtype=batch.dtype)
            kept["inputs"][self._cursor : self._cursor + batch.shape[0]] = batch
            self._cursor += batch.shape[0]

        handle = self.projection.register_forward_pre_hook(keep, prepend=True)
        try:
            yield
        finally:
            handle.remove()
        if self._cursor == self.windows:
            self.inputs = kept["inputs"]

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Within the block, the attention module's forward returns the projection of the kept
        inputs of the next windows (as many as its input holds) without computing the rest.
        RuntimeError when a pass does not go through exactly the kept windows."""
        if self.inputs is None:
            raise RuntimeError("no attention inputs were kept to replay")
        self._cursor = 0

        def replayed(hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
            first, count = self._cursor, hidden_states.shape[0]
            if first + count > self.windows:
                raise RuntimeError(f"attention replay: a pass asked for windows {first}..{first + count - 1} of "
                                   f"{self.windows} kept")
            self._cursor += count
            return self.projection(self.inputs[first : first + count].to(hidden_states.device)), None

        self.attention.forward = replayed
        try:
            yield
        finally:
            del self.attention.forward  # back to the class's forward
        if self._cursor != self.windows:
            raise RuntimeError(f"attention replay: a pass went through {self._cursor} of the {self.windows} "
                               "kept windows")

    def around_pass(self) -> contextlib.AbstractContextManager:
        """`replaying` once a pass kept the inputs, else `recording`."""
        return self.recording() if self.inputs is None else self.replaying()

    def replaying_if_kept(self) -> contextlib.AbstractContextManager:
        """`replaying` when a pass kept the inputs, else nothing."""
        return contextlib.nullcontext() if self.inputs is None else self.replaying()
