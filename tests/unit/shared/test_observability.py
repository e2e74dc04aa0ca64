"""The metrics and health server: endpoints, readiness checks, clean stop."""

from __future__ import annotations

import asyncio

import pytest

from keeper_shared.observability import HealthServer, ObservabilitySettings, serve_observability
from keeper_shared.observability.metrics import EVENTS_HANDLED


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_metrics_liveness_and_readiness() -> None:
    server = HealthServer(port=0)
    healthy = True

    async def check() -> bool:
        return healthy

    async def broken() -> bool:
        raise RuntimeError("down")

    server.add_readiness_check("redis", check)
    await server.start()
    try:
        EVENTS_HANDLED.labels(type="state.changed", outcome="ok").inc()
        status, body = await _get(server.port, "/metrics")
        assert status == 200
        assert 'keeper_messages_handled_total{outcome="ok",type="state.changed"}' in body
        assert "keeper_persist_seconds_bucket" in body
        assert await _get(server.port, "/healthz") == (200, "ok\n")
        assert await _get(server.port, "/readyz") == (200, "ready\n")
        healthy = False
        assert await _get(server.port, "/readyz") == (503, "not ready: redis\n")
        healthy = True
        server.add_readiness_check("rabbitmq", broken)
        assert (await _get(server.port, "/readyz"))[0] == 503
        assert (await _get(server.port, "/nope"))[0] == 404
        assert (await _get(server.port, "/healthz", method="POST"))[0] == 405
    finally:
        await server.stop()
    with pytest.raises(ConnectionRefusedError):
        await _get(server.port, "/healthz")


async def test_off_unless_a_port_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPER_METRICS_PORT", raising=False)
    async with serve_observability() as server:
        assert server is None
    async with serve_observability(ObservabilitySettings(port=0)) as server:
        assert server is None


async def test_serves_while_the_block_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from keeper_devtools.localstack import free_tcp_ports

    (port,) = free_tcp_ports(1)
    monkeypatch.setenv("KEEPER_METRICS_PORT", str(port))
    monkeypatch.setenv("KEEPER_METRICS_HOST", "127.0.0.1")
    async with serve_observability() as server:
        assert server is not None
        assert server.port == port
        assert (await _get(port, "/healthz"))[0] == 200
    with pytest.raises(ConnectionRefusedError):
        await _get(port, "/healthz")
