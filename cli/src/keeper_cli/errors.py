"""Exit codes of ``keeper`` (:class:`ExitCode`, shared with the HTTP API) and the error
that carries one."""

from __future__ import annotations

from keeper_shared.keeper_client.outcomes import ExitCode

__all__ = ["CliError", "ExitCode"]


class CliError(Exception):
    """Ends the command with ``message`` on stderr and ``code`` as exit status."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code
