"""Bus clients a test connects for itself to publish, call or consume, every one closed
when the test ends (the ``connect_bus`` fixture in ``tests/conftest.py``)."""

from __future__ import annotations

from typing import Protocol

from keeper_shared.bus.client import BusClient

CLOSE_GRACE_S = 5.0
"""Bound on each client's close at the end of a test (its consumers' work in flight)."""


class ConnectBus(Protocol):
    """Connects a bus client (to the session's broker unless ``url`` names another user or
    node); the test need not close it."""

    async def __call__(self, *, source: str, origin: str, url: str | None = None) -> BusClient:
        """A connected client publishing as ``source`` with routing-key origin ``origin``."""
        ...


class BusClients:
    """The clients one test connected, closed together at its end."""

    def __init__(self, default_url: str) -> None:
        self._default_url = default_url
        self._clients: list[BusClient] = []

    async def connect(self, *, source: str, origin: str, url: str | None = None) -> BusClient:
        """Connect a client as ``source``/``origin`` to ``url`` (the session's broker by
        default) and remember it for `close_all`."""
        client = await BusClient.connect(url or self._default_url, source=source, origin=origin)
        self._clients.append(client)
        return client

    async def close_all(self) -> None:
        """Close every client the test did not close itself, newest first."""
        for client in reversed(self._clients):
            if not client.connection.is_closed:
                await client.close(grace_s=CLOSE_GRACE_S)
        self._clients.clear()
