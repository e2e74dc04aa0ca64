"""The ``keeper`` command line (see :mod:`keeper_cli.app`)."""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``keeper`` console script."""
    import os

    from keeper_cli.app import app
    from keeper_shared.runtime.logging import configure_logging

    # Library warnings go to stderr, redacted; stdout stays for tables and JSON.
    configure_logging(
        "keeper-cli", json_output=False, level=os.environ.get("KEEPER_LOG_LEVEL", "WARNING")
    )
    app()


__all__ = ["main"]
