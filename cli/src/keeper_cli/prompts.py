"""What the CLI asks of the person at the terminal (confirmations, a passphrase) and the
progress it shows them while a request runs. Without a terminal nothing is asked: the
command says which option answers instead."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from keeper_cli import inputs, output
from keeper_cli.errors import CliError, ExitCode
from keeper_cli.typer_click import UsageError

PASSPHRASE_VARIABLE = "KEEPER_BUNDLE_PASSPHRASE"  # noqa: S105 - a variable name, not a secret


@contextlib.contextmanager
def progress(message: str, *, quiet: bool, total: int = 1) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr while a long request runs (nothing with --json): elapsed
    time, and done/total when there are several items. Yields the "one item done" step.
    Into a pipe or a log file it draws nothing: a bar there is only noise."""
    if quiet or not output.stderr.is_terminal:
        yield lambda: None
        return
    columns: list[ProgressColumn] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total > 1:
        columns += [BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), console=output.stderr, transient=True) as bar:
        task = bar.add_task(message, total=total)
        yield lambda: bar.advance(task)


def confirm(question: str, *, yes: bool) -> None:
    """Go on only when ``yes`` or the person at the terminal says so; else exit 5."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError(
            f"{question} Not confirmed: pass --yes to do it without asking.", ExitCode.ABORTED
        )
    if not typer.confirm(question, default=False, err=True):
        raise CliError("not confirmed; nothing was changed", ExitCode.ABORTED)


def passphrase(*, confirm_it: bool, passphrase_file: Path | None) -> str:
    """The bundle passphrase: from ``--passphrase-file``, else ``KEEPER_BUNDLE_PASSPHRASE``,
    else asked at the terminal (twice with ``confirm_it``); checked before any request."""
    if passphrase_file is not None:
        return inputs.passphrase_from_file(passphrase_file)
    from_env = os.environ.get(PASSPHRASE_VARIABLE)
    if from_env:
        return inputs.passphrase(from_env, PASSPHRASE_VARIABLE)
    if not sys.stdin.isatty():
        raise UsageError(
            f"a bundle passphrase is needed: --passphrase-file or {PASSPHRASE_VARIABLE}"
        )
    typed = typer.prompt(
        "Bundle passphrase", hide_input=True, confirmation_prompt=confirm_it, err=True
    )
    return inputs.passphrase(str(typed), "the passphrase typed")
