"""What a client request came to, told the same way by every client: the ``keeper`` CLI
exits with these codes, the HTTP API puts their labels in its problem details
(``docs/api.md``) and maps each to an HTTP status."""

from __future__ import annotations

import enum

from keeper_shared.bus.client import (
    CallError,
    CallTimeoutError,
    CommandRejectedError,
    NoRouteError,
)
from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.messages.envelope import MessageError


class ExitCode(enum.IntEnum):
    """What a script can tell from ``$?`` (listed in ``keeper --help`` and the README)."""

    OK = 0
    REFUSED = 1
    """Policy or the store refused or failed the request (the message says why)."""
    USAGE = 2
    """Bad input: an argument, option, file or environment variable breaks a rule."""
    UNKNOWN_VM = 3
    """No VM (or template, for the template commands) with that id or name exists."""
    UNREACHABLE = 4
    """RabbitMQ, policy or the state store cannot be reached."""
    ABORTED = 5
    """A destructive action was not confirmed."""
    TIMEOUT = 6
    """No answer in time (the service, or a host it waited for, may still act on it)."""
    DENIED = 7
    """RabbitMQ refused the login or a certificate (either side's), or the user lacks a
    permission."""
    INTERRUPTED = 130
    """Ctrl-C: what was already sent goes on server side."""

    @property
    def label(self) -> str:
        """The name scripts read in a JSON error (``error`` field), e.g. ``unknown-vm``."""
        return self.name.lower().replace("_", "-")

    @property
    def meaning(self) -> str:
        """One line for the help text."""
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "done",
    ExitCode.REFUSED: "refused or failed (the reason is printed)",
    ExitCode.USAGE: "bad input (the field and the rule are named)",
    ExitCode.UNKNOWN_VM: "unknown VM or template",
    ExitCode.UNREACHABLE: "RabbitMQ, policy or the state store cannot be reached",
    ExitCode.ABORTED: "not confirmed (nothing was changed)",
    ExitCode.TIMEOUT: "no answer in time (it may still be carried out)",
    ExitCode.DENIED: "RabbitMQ refused the login, a permission or a TLS certificate",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); what was sent goes on",
}


REQUEST_FAILURES = (KeeperRequestError, CallError, MessageError)
"""What a request to policy or the store fails with, short of the broker itself failing."""


def request_failure(
    error: KeeperRequestError | CallError | MessageError, *, goes_on: str
) -> tuple[ExitCode, str]:
    """The exit reason and the one-line message for a failed request. ``goes_on`` says
    what became of the request when no answer came (it may still be carried out, or it
    only read)."""
    if isinstance(error, KeeperRequestError):
        if error.timed_out:
            return ExitCode.TIMEOUT, f"{error}; {goes_on}"
        return ExitCode.REFUSED, str(error)
    if isinstance(error, CallTimeoutError):
        return ExitCode.TIMEOUT, f"no answer in time ({error}); {goes_on}"
    if isinstance(error, NoRouteError):
        return ExitCode.UNREACHABLE, f"{error}: is the service running?"
    if isinstance(error, CommandRejectedError):
        # The service answered that it could not take the request at all: nothing was done.
        return ExitCode.REFUSED, f"rejected by the service ({error}); nothing was done"
    if isinstance(error, CallError):
        return ExitCode.UNREACHABLE, str(error)
    return ExitCode.REFUSED, f"unexpected reply ({error})"
