"""A tiny HTTP server for ``/metrics`` (Prometheus), ``/healthz`` (liveness) and
``/readyz`` (readiness), on the service's own event loop.

Liveness answers 200 whenever the loop can answer at all. Readiness runs the registered
checks (bus connected, Redis answering, ...) with a timeout and answers 503 with the names
of the failing ones. :meth:`HealthServer.stop` closes the socket; services call it from the
shutdown path their SIGTERM handler starts, so the port is released before they exit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from keeper_shared.observability.metrics import READY

log = structlog.get_logger(__name__)

ReadinessCheck = Callable[[], Awaitable[bool]]
_MAX_REQUEST_BYTES = 8192


class ObservabilitySettings(BaseSettings):
    """``KEEPER_METRICS_PORT`` (unset or 0: no server) and ``KEEPER_METRICS_HOST``."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_METRICS_", frozen=True, extra="ignore")

    port: int | None = Field(default=None, ge=0, le=65535, description="0 or unset: off.")
    host: str = Field(
        default="0.0.0.0",  # noqa: S104 - scraped and probed from outside the machine/pod
        description="Address to listen on.",
    )
    check_timeout_s: float = Field(default=2.0, gt=0, description="Bound on each check.")


class HealthServer:
    """Serves metrics, liveness and readiness until stopped."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        registry: CollectorRegistry = REGISTRY,
        check_timeout_s: float = 2.0,
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._check_timeout_s = check_timeout_s
        self._checks: dict[str, ReadinessCheck] = {}
        self._server: asyncio.Server | None = None
        self._ready_flag = True

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        """Readiness fails while ``check()`` returns False, raises or takes too long."""
        self._checks[name] = check

    def set_ready(self, ready: bool) -> None:
        """Mark the process (not) ready regardless of the checks, e.g. while stopping."""
        self._ready_flag = ready

    @property
    def port(self) -> int:
        """The port listened on (the real one when started with port 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("observability listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        READY.set(0)
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
        self._server = None

    async def failing_checks(self) -> list[str]:
        """Names of the readiness checks that do not pass now."""
        if not self._ready_flag:
            return ["stopping"]
        failing = []
        for name, check in self._checks.items():
            try:
                ok = await asyncio.wait_for(check(), timeout=self._check_timeout_s)
            except Exception:  # a check that raises is a failing check
                ok = False
            if not ok:
                failing.append(name)
        READY.set(0 if failing else 1)
        return failing

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            status, content_type, body = await self._respond(request[:_MAX_REQUEST_BYTES])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, content_type, body = "400 Bad Request", "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def _respond(self, request: bytes) -> tuple[str, str, bytes]:
        line = request.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path = parts[1].split("?", 1)[0]
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            failing = await self.failing_checks()
            if failing:
                return (
                    "503 Service Unavailable",
                    "text/plain",
                    ("not ready: " + ", ".join(failing) + "\n").encode(),
                )
            return "200 OK", "text/plain", b"ready\n"
        return "404 Not Found", "text/plain", b"not found\n"


@contextlib.asynccontextmanager
async def serve_observability(
    settings: ObservabilitySettings | None = None,
    checks: dict[str, ReadinessCheck] | None = None,
) -> AsyncIterator[HealthServer | None]:
    """Run the server for the duration of the block when ``KEEPER_METRICS_PORT`` is set
    (yields None otherwise); it is stopped on the way out, SIGTERM included."""
    settings = settings or ObservabilitySettings()
    if not settings.port:
        yield None
        return
    server = HealthServer(
        host=settings.host, port=settings.port, check_timeout_s=settings.check_timeout_s
    )
    for name, check in (checks or {}).items():
        server.add_readiness_check(name, check)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
