"""The click that typer runs on.

Typer (0.29 and later) carries its own copy of click (``typer._click``) and no longer
runs on the installed ``click`` package: a usage error raised from that package would
not be recognised as one (it would end the command as an unexpected failure), nor would
its context be the running one. Everything the CLI needs from click comes from here, so
that dependency on typer's inner layout sits in one file.
"""

from __future__ import annotations

from typer._click.core import Context
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer._click.globals import get_current_context
from typer._click.utils import echo

__all__ = [
    "ClickException",
    "Context",
    "NoArgsIsHelpError",
    "UsageError",
    "echo",
    "get_current_context",
]
