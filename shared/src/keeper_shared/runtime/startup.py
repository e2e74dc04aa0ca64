"""Waiting for Redis or the broker at start-up instead of exiting.

A service started while a dependency is down (a machine booting its services in any order,
a restart during a broker or Redis outage) would otherwise exit at once and leave the rest
to its supervisor's restart loop; it waits instead, with backoff, until the dependency
answers or it is told to stop. Errors that waiting cannot cure (bad credentials, a
certificate the other side refuses, Redis without persistence) are raised at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.exceptions
import structlog

from keeper_shared.runtime.tls_failure import TlsHandshakeError, certificate_refused

T = TypeVar("T")

REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # also "LOADING": a restarted Redis replaying its AOF
    redis.exceptions.TimeoutError,
)
"""Redis errors that mean "not up yet", worth waiting out."""

log = structlog.get_logger(__name__)

FIRST_RETRY_S = 0.5
MAX_RETRY_S = 5.0


class StoppedWhileWaitingError(Exception):
    """The service was told to stop before its dependency came up."""


async def wait_for_dependency(
    attempt: Callable[[], Awaitable[T]],
    dependency: str,
    stop: asyncio.Event,
    *,
    retry_on: tuple[type[BaseException], ...],
    fatal: tuple[type[BaseException], ...] = (),
) -> T:
    """Run ``attempt`` until it succeeds; retry (backing off up to 5 s) on ``retry_on``
    unless the error is also one of ``fatal``. A certificate refused by either side (a
    wrong CA or client certificate) is fatal too: TlsHandshakeError says why. Raises
    StoppedWhileWaitingError when ``stop`` is set meanwhile."""
    delay = FIRST_RETRY_S
    while True:
        try:
            return await attempt()
        except fatal:
            raise
        except retry_on as error:
            tls_reason = certificate_refused(error)
            if tls_reason is not None:
                raise TlsHandshakeError(f"TLS with {dependency} failed: {tls_reason}") from error
            log.warning(
                "waiting for a dependency",
                dependency=dependency,
                reason=type(error).__name__,
                retry_in_s=delay,
            )
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            delay = min(delay * 2, MAX_RETRY_S)
            continue
        raise StoppedWhileWaitingError(f"stopped while waiting for {dependency}")
