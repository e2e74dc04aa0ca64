"""The ``keeper`` command group: how the command as a whole ends.

Click would print a usage error as a box of several lines and let any other exception
through as a traceback. Here every way of ending becomes an exit code and at most one
line on stderr (a JSON error document when the command line asks for ``--json``):
usage errors exit 2 naming the field, an unexpected failure exits 1 naming its type
(its traceback only in the debug log, ``KEEPER_LOG_LEVEL=DEBUG``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from keeper_cli import output, typer_click
from keeper_cli.errors import ExitCode

# The standard library's logger: unconfigured (a test, a library user) it drops debug
# lines, where an unconfigured structlog would print the traceback with its locals.
log = logging.getLogger(__name__)


def wants_json(arguments: Sequence[str]) -> bool:
    """Whether the command line asks for JSON (before a ``--`` that ends the options)."""
    options = arguments[: arguments.index("--")] if "--" in arguments else arguments
    return "--json" in options


class KeeperGroup(TyperGroup):
    """The root group of ``keeper``; see the module's docstring."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> int:
        """Run the command; the exit code is returned, or the process exits with it."""
        arguments = list(sys.argv[1:] if args is None else args)
        code = self._run(arguments, prog_name, complete_var, windows_expand_args, extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(
        self,
        arguments: list[str],
        prog_name: str | None,
        complete_var: str | None,
        windows_expand_args: bool,
        extra: dict[str, Any],
    ) -> int:
        as_json = wants_json(arguments)
        try:
            outcome = super().main(
                arguments,
                prog_name,
                complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
        except typer_click.NoArgsIsHelpError as error:
            # `keeper` or `keeper vm` alone: the help, as click would show it.
            typer_click.echo(error.ctx.get_help(), err=True)
            return int(ExitCode.USAGE)
        except typer_click.UsageError as error:
            # Click's own messages may span lines ("Choose from:" and one choice a line).
            message = " ".join(error.format_message().split())
            if error.ctx is not None and not as_json:
                message += f" (see `{error.ctx.command_path} -h`)"
            output.failure(message, ExitCode.USAGE, as_json=as_json)
            return int(ExitCode.USAGE)
        except typer.Abort:
            # Ctrl-C or end of input at a question: nothing was confirmed.
            output.failure("not confirmed; nothing was changed", ExitCode.ABORTED, as_json=as_json)
            return int(ExitCode.ABORTED)
        except typer_click.ClickException as error:
            output.failure(error.format_message(), ExitCode.USAGE, as_json=as_json)
            return int(ExitCode.USAGE)
        except Exception as error:
            log.debug("keeper failed unexpectedly", exc_info=True)
            output.failure(
                f"unexpected failure ({type(error).__name__}); KEEPER_LOG_LEVEL=DEBUG shows where",
                ExitCode.REFUSED,
                as_json=as_json,
            )
            return int(ExitCode.REFUSED)
        # Without standalone mode click returns the command's value, or the code of an
        # Exit it raised.
        return outcome if isinstance(outcome, int) else int(ExitCode.OK)
