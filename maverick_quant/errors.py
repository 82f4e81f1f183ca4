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


class ContentError(InputError):
    """Bad model content (NaN or Inf in a tensor, activations or statistics that overflow):
    found inside a layer of a long run, mending the model and `--resume` go on from there
    (`kept_when_refused`); an option found wrong mid-run would change the run's identity, so
    that refusal keeps nothing."""


@contextlib.contextmanager
def kept_when_refused(index: int):
    """A ContentError raised inside layer `index` of a layer-by-layer run (a NaN in its shard,
    activations or statistics that overflow) is named with the layer and, after finished
    layers, keeps them for `--resume` once the model is mended instead of throwing away hours
    of work (quantize, validate, imatrix, coverage). Other InputErrors pass unchanged."""
    try:
        yield
    except ContentError as exc:
        if exc.keep_work:
            raise
        finished = "layer 0 is" if index == 1 else f"layers 0-{index - 1} are"
        kept = f"; the finished {finished} kept: mend it, then --resume, or --force to start over" if index else ""
        raise ContentError(f"{exc} (in layer {index}){kept}", keep_work=index > 0) from None
