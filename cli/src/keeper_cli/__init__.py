"""The ``keeper`` command line (see :mod:`keeper_cli.app`)."""

from __future__ import annotations

QUIET_LIBRARIES = ("aiormq", "aio_pika")
"""Their connection errors come with tracebacks; the CLI says what failed in one line
instead (their logs show with ``KEEPER_LOG_LEVEL=DEBUG``)."""


def main() -> None:
    """Entry point of the ``keeper`` console script."""
    import logging
    import os

    from keeper_cli.app import app
    from keeper_shared.runtime.logging import configure_logging

    level = os.environ.get("KEEPER_LOG_LEVEL", "WARNING")
    # Library warnings go to stderr, redacted; stdout stays for tables and JSON.
    configure_logging("keeper-cli", json_output=False, level=level)
    if level.upper() != "DEBUG":
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    app()


__all__ = ["main"]
