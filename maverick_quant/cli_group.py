"""The command group under every `maverick-quant` command: how an error becomes an exit code.

Exit codes: 0 success; 1 a validation gate failed (the commands exit so themselves); 2 bad
usage or bad input (the message names the file, tensor or option) or an output that cannot be
written (a full disk); 3 any other failure (the traceback is printed); 130 interrupted.
"""

from __future__ import annotations

import click

from maverick_quant.errors import InputError


class BadInput(click.ClickException):
    """InputError shown to the user; exit code 2 like click's usage errors."""

    exit_code = 2


class RunFailed(click.ClickException):
    """Any other error (disk full, out of memory, a bug): exit code 3, never 1, which a CI job
    reads as a failed validation gate; the traceback is printed above the message."""

    exit_code = 3


class Interrupted(click.ClickException):
    """Ctrl-C: exit code 130 (the shell's for SIGINT), not click's 1, a failed gate's."""

    exit_code = 130


class Group(click.Group):
    """Exit codes: 0 done, 1 a validation gate failed (the commands exit so themselves), 2 bad
    usage or input (InputError, click's usage errors) or an output the machine cannot write
    (`outputs.WRITE_FAILURES`: a full disk, a read-only folder), 3 any other failure, 130
    interrupted."""

    def resolve_command(self, ctx, args):
        """The subcommand, refused under torchrun unless it splits its work (distributed.refuse_split)."""
        from maverick_quant.distributed import refuse_split

        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            refuse_split(command.name)
        return name, command, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            raise BadInput(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, SystemExit):
            raise
        except (KeyboardInterrupt, click.Abort):
            resumable = any(param.name == "resume" for param in ctx.command.commands[ctx.invoked_subcommand].params) \
                if ctx.invoked_subcommand in ctx.command.commands else False
            raise Interrupted("interrupted" + ("; the same command with --resume goes on from where it stopped"
                                               if resumable else "")) from None
        except Exception as exc:
            import traceback

            from maverick_quant.outputs import WRITE_FAILURES, io_failure

            if isinstance(exc, OSError) and exc.errno in WRITE_FAILURES:  # outputs are renamed into place only when whole
                raise BadInput(f"{io_failure(exc)}; fix the cause and run the command again") from None
            traceback.print_exc()
            raise RunFailed(f"{type(exc).__name__}: {exc} (not bad input and not a failed gate: the traceback "
                            "is above)") from None
