"""Exit codes of ``keeper`` and the error that carries one."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What a script can tell from ``$?``."""

    OK = 0
    REFUSED = 1
    """Policy or the store refused or failed the request (the message says why)."""
    USAGE = 2
    """Bad arguments."""
    UNKNOWN_VM = 3
    """No VM with that id or name is registered."""
    UNREACHABLE = 4
    """RabbitMQ, policy or the state store cannot be reached."""
    ABORTED = 5
    """A destructive action was not confirmed."""
    TIMEOUT = 6
    """No answer in time (the service may still carry the request out)."""


class CliError(Exception):
    """Ends the command with ``message`` on stderr and ``code`` as exit status."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code
