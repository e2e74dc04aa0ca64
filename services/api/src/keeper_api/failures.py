"""The CLI's failures, told over HTTP: each error a request to policy or the store can end
in becomes the problem detail with the reason and message ``keeper`` exits with (both
decide them with :func:`~keeper_shared.keeper_client.outcomes.request_failure`)."""

from __future__ import annotations

import aio_pika.exceptions
import pamqp.exceptions

from keeper_api.problems import ProblemError
from keeper_api.state import BusNotReadyError
from keeper_shared.keeper_client.outcomes import REQUEST_FAILURES, ExitCode, request_failure

BUS_FAILURES = (
    *REQUEST_FAILURES,
    aio_pika.exceptions.AMQPError,
    pamqp.exceptions.PAMQPException,
    ConnectionError,
)
"""What a request over the bus can fail with besides a bug."""


def as_problem(error: BaseException, *, changes: bool) -> ProblemError:
    """The problem detail for ``error``; ``changes``: the request may change something, so a
    time-out says it may still be carried out."""
    if isinstance(error, REQUEST_FAILURES):
        goes_on = (
            "it may still be carried out server side; follow the VM's state"
            if changes
            else "it only read, nothing was changed"
        )
        code, message = request_failure(error, goes_on=goes_on)
        return ProblemError(message, code)
    if isinstance(error, BusNotReadyError):
        return ProblemError(str(error), ExitCode.UNREACHABLE)
    return ProblemError(f"RabbitMQ cannot be used ({type(error).__name__})", ExitCode.UNREACHABLE)
