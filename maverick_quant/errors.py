"""Exceptions the CLI maps to exit codes.

`InputError` means the user gave us something we refuse (a bad file, tensor or option):
the CLI prints its message and exits with code 2, after removing any partial output.
"""


class InputError(Exception):
    """Bad input: the message names the file, tensor or option and what was expected."""
