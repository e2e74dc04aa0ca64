"""Human tables on a terminal, JSON for automation, and how a failure is told: one line
on stderr, or one JSON error document there with ``--json``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from keeper_cli.errors import ExitCode
from keeper_cli.json_documents import document

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def emit_json(data: Any) -> None:
    """One JSON document on stdout (plain, so `jq` reads it); build its objects with
    :func:`keeper_cli.json_documents.document`."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def failure(message: str, code: ExitCode, *, as_json: bool) -> None:
    """Tell why the command ends with ``code``: ``error: <message>`` on stderr, or with
    ``as_json`` a ``keeper.error`` document there (stdout stays empty either way)."""
    if as_json:
        error = document("error", {"error": code.label, "exit_code": int(code), "message": message})
        sys.stderr.write(json.dumps(error) + "\n")
        sys.stderr.flush()
        return
    # Escaped: a message quoting user input ("[x]") is not rich markup.
    stderr.print(f"[red]error:[/red] {escape(message)}", highlight=False)


def warning(message: str) -> None:
    """A warning line on stderr (the command still succeeds)."""
    stderr.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table on stdout."""
    view = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        view.add_column(column)
    for row in rows:
        view.add_row(*("-" if cell is None else str(cell) for cell in row))
    # On a terminal rich fits the table to it; into a pipe or file nothing is cut short.
    console = stdout if stdout.is_terminal else Console(soft_wrap=True, width=400)
    console.print(view)


def facts(pairs: Sequence[tuple[str, Any]]) -> None:
    """`key: value` lines on stdout."""
    width = max(len(key) for key, _ in pairs)
    for key, value in pairs:
        stdout.print(f"{key + ':':<{width + 1}} {'-' if value is None else value}", highlight=False)


def age(seconds: float | None) -> str | None:
    """A short human age: 12s, 5m, 3h, 2d."""
    if seconds is None:
        return None
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"
