"""Exceptions the CLI maps to exit codes.

`InputError` means the user gave us something we refuse (a bad file, tensor or option):
the CLI prints its message and exits with code 2, after removing any partial output.
"""


class InputError(Exception):
    """Bad input: the message names the file, tensor or option and what was expected.

    `keep_work`: found after finished work worth keeping (a resumable run keeps its state for
    `--resume` instead of discarding it; e.g. a validation gate naming a missing key)."""

    def __init__(self, message: str = "", keep_work: bool = False):
        super().__init__(message)
        self.keep_work = keep_work
