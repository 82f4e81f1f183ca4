"""Exceptions the CLI maps to exit codes.

`InputError` means the user gave us something we refuse (a bad file, tensor or option):
the CLI prints its message and exits with code 2, after removing any partial output.
"""

import contextlib


class InputError(Exception):
    """Bad input: the message names the file, tensor or option and what was expected.

    `keep_work`: found after finished work worth keeping (a resumable run keeps its state for
    `--resume` instead of discarding it; e.g. a validation gate naming a missing key)."""

    def __init__(self, message: str = "", keep_work: bool = False):
        super().__init__(message)
        self.keep_work = keep_work


@contextlib.contextmanager
def kept_when_refused(index: int):
    """Bad input found inside layer `index` of a layer-by-layer run (a NaN in its shard,
    statistics that overflow) is named with the layer and, after finished layers, keeps them
    for `--resume` once mended (as activations gone NaN do) instead of throwing away hours of
    work (quantize and validate)."""
    try:
        yield
    except InputError as exc:
        if exc.keep_work:
            raise
        finished = "layer 0 is" if index == 1 else f"layers 0-{index - 1} are"
        kept = f"; the finished {finished} kept: mend it, then --resume, or --force to start over" if index else ""
        raise InputError(f"{exc} (in layer {index}){kept}", keep_work=index > 0) from None
