"""Connecting to one node of a RabbitMQ cluster, and moving to another when it goes away.

aio-pika's robust connection reconnects, restoring its channels, queues and consumers, but
only ever to the one URL it was given. It reads that URL (``connection.url``) afresh on each
attempt, so pointing it at the next node while it is disconnected is all a failover needs:
the restore then re-declares everything on the node it reached. Every node of a cluster
serves every queue (quorum queues have a member on each), so any live node will do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import aio_pika
import structlog
import yarl
from aio_pika.abc import AbstractRobustConnection

log = structlog.get_logger(__name__)

RECONNECT_INTERVAL_S = 1.0
"""Pause between two connection attempts while the connection is down; each attempt goes
to the next node, so a dead node costs about this long."""


def broker_user(urls: Sequence[str]) -> str:
    """The AMQP user the URLs share (the identity the broker validates); a list that mixes
    users is a configuration error."""
    users = {yarl.URL(url).user or "" for url in urls}
    if len(users) != 1:
        raise ValueError("every RabbitMQ URL of one service must name the same user")
    return users.pop()


def node_label(url: yarl.URL) -> str:
    """host:port of a broker URL, without its credentials, for logs."""
    return f"{url.host}:{url.port}"


async def connect_first_answering(
    urls: Sequence[str], *, connection_name: str, timeout_s: float = 30.0
) -> tuple[AbstractRobustConnection, int]:
    """Connect to the first node in ``urls`` that answers; return the connection and the
    node's index. Raises the last node's error when none answers."""
    if not urls:
        raise ValueError("no RabbitMQ URL given")
    last_error: BaseException | None = None
    for index, url in enumerate(urls):
        try:
            connection = await aio_pika.connect_robust(
                url,
                client_properties={"connection_name": connection_name},
                timeout=timeout_s,
                reconnect_interval=RECONNECT_INTERVAL_S,
            )
        except (aio_pika.exceptions.AMQPError, OSError, TimeoutError) as error:
            last_error = error
            if len(urls) > 1:
                log.warning(
                    "broker node did not answer",
                    node=node_label(yarl.URL(url)),
                    reason=type(error).__name__,
                )
            continue
        return connection, index
    assert last_error is not None
    raise last_error


class NodeFailover:
    """While ``connection`` is down, points it at the next node of ``urls`` after each
    failed attempt, round robin, until it is up again."""

    def __init__(self, connection: AbstractRobustConnection, urls: Sequence[str], current: int):
        """Watch ``connection``, now connected to ``urls[current]``."""
        self._connection = connection
        self._urls = [yarl.URL(url) for url in urls]
        self._index = current
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        if len(self._urls) > 1:
            connection.close_callbacks.add(self._on_lost)

    async def stop(self) -> None:
        """Stop moving the connection (before closing it on purpose)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _on_lost(self, _sender: Any, _error: BaseException | None = None) -> None:
        if self._stopped or (self._task is not None and not self._task.done()):
            return
        # The node that dropped us is the likeliest to be down: the robust connection's
        # first attempt, which it schedules right after this callback, goes to the next.
        lost = node_label(self._urls[self._index])
        self._point_at_next(lost)
        self._task = asyncio.get_running_loop().create_task(self._move_until_connected(lost))

    def _point_at_next(self, lost: str) -> None:
        self._index = (self._index + 1) % len(self._urls)
        target = self._urls[self._index]
        # aio-pika reads `url` on every attempt; it is a public attribute (its own
        # update_secret rewrites it the same way). An attempt already under way keeps the
        # URL it started with.
        self._connection.url = target  # type: ignore[attr-defined]
        log.warning("broker node lost, trying another", lost=lost, next=node_label(target))

    async def _move_until_connected(self, lost: str) -> None:
        connection = self._connection
        while not self._stopped and not connection.is_closed:
            with contextlib.suppress(TimeoutError):
                # About one attempt per node: the robust connection pauses between them.
                await asyncio.wait_for(connection.connected.wait(), 1.5 * RECONNECT_INTERVAL_S)
            if connection.connected.is_set():
                log.info("broker node reached", node=node_label(self._urls[self._index]))
                return
            self._point_at_next(lost)
