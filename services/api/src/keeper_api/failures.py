"""The CLI's failures, told over HTTP: each error a request to policy or the store can end
in becomes the problem detail with the reason ``keeper`` would exit with (as
``keeper_cli.running.run`` decides it)."""

from __future__ import annotations

import aio_pika.exceptions
import pamqp.exceptions

from keeper_api.problems import ProblemError
from keeper_shared.bus.client import (
    CallError,
    CallTimeoutError,
    CommandRejectedError,
    NoRouteError,
)
from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.keeper_client.outcomes import ExitCode
from keeper_shared.messages.envelope import MessageError

BUS_FAILURES = (
    KeeperRequestError,
    CallError,
    MessageError,
    aio_pika.exceptions.AMQPError,
    pamqp.exceptions.PAMQPException,
    ConnectionError,
)
"""What a request over the bus can fail with besides a bug."""


def as_problem(error: BaseException, *, changes: bool) -> ProblemError:
    """The problem detail for ``error``; ``changes``: the request may change something, so a
    time-out says it may still be carried out."""
    goes_on = (
        "it may still be carried out server side; follow the VM's state"
        if changes
        else "it only read, nothing was changed"
    )
    if isinstance(error, KeeperRequestError):
        if error.timed_out:
            return ProblemError(f"{error}; {goes_on}", ExitCode.TIMEOUT)
        return ProblemError(str(error), ExitCode.REFUSED)
    if isinstance(error, CallTimeoutError):
        return ProblemError(f"no answer in time ({error}); {goes_on}", ExitCode.TIMEOUT)
    if isinstance(error, NoRouteError):
        return ProblemError(f"{error}: is the service running?", ExitCode.UNREACHABLE)
    if isinstance(error, CommandRejectedError):
        return ProblemError(
            f"rejected by the service ({error}); nothing was done", ExitCode.REFUSED
        )
    if isinstance(error, MessageError):
        return ProblemError(f"unexpected reply ({error})", ExitCode.REFUSED)
    return ProblemError(f"RabbitMQ cannot be used ({type(error).__name__})", ExitCode.UNREACHABLE)
