"""A libvirt connection kept open, with its lifecycle events bridged into asyncio.

libvirt delivers events from its own event loop, which must run in a thread of ours; each
event is handed to the asyncio loop with ``call_soon_threadsafe``.

A connection to a daemon (``qemu:///system``) dies when libvirtd restarts. libvirt says so
through the connection's close callback; the agent then reconnects with a growing backoff,
registers its callbacks on the new connection and lets its owner re-read every domain,
because lifecycle events that happened in between were never delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import libvirt
import structlog

from keeper_host_agent.hypervisor.errors import HypervisorError
from keeper_host_agent.hypervisor.libvirt_errors import translated
from keeper_host_agent.hypervisor.port import LifecycleEvent
from keeper_shared.messages.vm import StopReason

log = structlog.get_logger(__name__)

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}
_KEEPALIVE_INTERVAL_S = 5
_KEEPALIVE_COUNT = 3

_STOP_REASONS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: StopReason.SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: StopReason.DESTROYED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: StopReason.CRASHED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: StopReason.MIGRATED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: StopReason.SAVED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: StopReason.FAILED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: StopReason.FROM_SNAPSHOT,
}
_EVENT_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
}


class LibvirtConnection:
    """One libvirt connection with its event thread; reconnects when the daemon goes away."""

    def __init__(
        self, uri: str, *, reconnect_initial_s: float = 0.5, reconnect_max_s: float = 5.0
    ) -> None:
        self._uri = uri
        self._reconnect_initial_s = reconnect_initial_s
        self._reconnect_max_s = reconnect_max_s
        self._connection: libvirt.virConnect | None = None
        self._callback_id: int | None = None
        self._generation = 0
        self._event_thread: threading.Thread | None = None
        self._running = False
        self._wake_timer: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_event: Callable[[LifecycleEvent], None] | None = None
        self._on_reconnect: Callable[[], Awaitable[None]] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._lost_while_connecting = False
        self.reconnects = 0
        """How many times the connection was re-established after libvirt closed it."""

    @property
    def connected(self) -> bool:
        """True while a connection is open (not lost and not yet re-established)."""
        return self._connection is not None

    def open(
        self,
        on_event: Callable[[LifecycleEvent], None],
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Connect and start delivering lifecycle events to ``on_event`` on this loop.

        ``on_reconnect`` runs on this loop after each re-established connection (not after
        the first one): events missed while disconnected are lost, so it re-reads the view.
        """
        self._loop = asyncio.get_running_loop()
        self._on_event = on_event
        self._on_reconnect = on_reconnect
        # libvirt prints every error to stderr by default; errors reach us as exceptions and
        # are logged once, by us.
        libvirt.registerErrorHandler(lambda _ctx, _error: None, None)
        # The default event implementation must be registered before the connection opens.
        libvirt.virEventRegisterDefaultImpl()
        self._running = True
        # A periodic no-op timer wakes the event loop so the thread notices a stop request.
        self._wake_timer = libvirt.virEventAddTimeout(500, lambda _timer, _opaque: None, None)
        self._event_thread = threading.Thread(
            target=self._run_event_loop, name="libvirt-events", daemon=True
        )
        self._event_thread.start()
        try:
            self._connection = self._connect()
        except HypervisorError:
            self._running = False
            raise

    def _connect(self) -> libvirt.virConnect:
        """Open a connection with the lifecycle and close callbacks on it (blocking)."""
        try:
            connection = libvirt.open(self._uri)
        except libvirt.libvirtError as error:
            raise translated(error, f"cannot connect to {self._uri}") from None
        self._generation += 1
        try:
            # Drivers without a daemon (test:///) accept the close callback and never call
            # it, and refuse keepalive; a daemon that hangs without closing the socket is
            # noticed by keepalive within about 20 s.
            connection.registerCloseCallback(self._closed_by_libvirt, self._generation)
            with contextlib.suppress(libvirt.libvirtError):
                connection.setKeepAlive(_KEEPALIVE_INTERVAL_S, _KEEPALIVE_COUNT)
            self._callback_id = connection.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
            )
        except libvirt.libvirtError as error:
            self._release(connection)
            raise translated(error, f"cannot watch {self._uri}") from None
        return connection

    def _lifecycle(
        self, _conn: object, domain: libvirt.virDomain, event: int, detail: int, _o: object
    ) -> None:
        """libvirt's lifecycle callback, on the libvirt event thread."""
        name = _EVENT_NAMES.get(event)
        if name is None or self._loop is None or self._on_event is None:
            return
        reason = _STOP_REASONS.get(detail, StopReason.UNKNOWN) if name == "stopped" else None
        lifecycle = LifecycleEvent(
            vm_id=domain.UUIDString().lower(),
            name=domain.name(),
            event=name,
            stop_reason=reason,
        )
        self._loop.call_soon_threadsafe(self._on_event, lifecycle)

    def _closed_by_libvirt(self, _conn: object, reason: int, generation: Any) -> None:
        """libvirt's close callback, on the libvirt event thread: hand over to asyncio."""
        if self._loop is not None and self._running:
            self._loop.call_soon_threadsafe(self._connection_lost, int(generation), reason)

    def _connection_lost(self, generation: int, reason: int) -> None:
        if not self._running or generation != self._generation:
            return  # a stale callback of a connection already replaced or closed by us
        if self._connection is None:
            # The connection a reconnect has just opened died before it was handed over.
            self._lost_while_connecting = True
            return
        lost, self._connection = self._connection, None
        log.warning(
            "libvirt connection lost",
            libvirt_uri=self._uri,
            reason=_CLOSE_REASONS.get(reason, str(reason)),
        )
        self._reconnect_task = asyncio.create_task(self._reconnect(lost))

    async def _reconnect(self, lost: libvirt.virConnect) -> None:
        await asyncio.to_thread(self._release, lost)
        delay = self._reconnect_initial_s
        attempt = 0
        while self._running:
            attempt += 1
            self._lost_while_connecting = False
            try:
                connection = await asyncio.to_thread(self._connect)
            except HypervisorError as error:
                log.info(
                    "libvirt not reachable yet",
                    attempt=attempt,
                    retry_in_s=delay,
                    reason=str(error),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_max_s)
                continue
            if not self._running:  # closed while the connect ran
                await asyncio.to_thread(self._release, connection)
                return
            if self._lost_while_connecting:
                await asyncio.to_thread(self._release, connection)
                await asyncio.sleep(delay)
                continue
            self._connection = connection
            self.reconnects += 1
            log.info("libvirt reconnected", libvirt_uri=self._uri, attempts=attempt)
            if self._on_reconnect is not None:
                try:
                    await self._on_reconnect()
                except HypervisorError as error:
                    # Lost again already: its close callback starts the next round.
                    log.warning("view not rebuilt after reconnect", reason=str(error))
            return

    def _release(self, connection: libvirt.virConnect) -> None:
        """Drop our callbacks from a connection and close it; it may be dead already."""
        with contextlib.suppress(libvirt.libvirtError):
            connection.unregisterCloseCallback()
        if self._callback_id is not None:
            with contextlib.suppress(libvirt.libvirtError):
                connection.domainEventDeregisterAny(self._callback_id)
            self._callback_id = None
        with contextlib.suppress(libvirt.libvirtError):
            connection.close()

    def _run_event_loop(self) -> None:
        while self._running:
            libvirt.virEventRunDefaultImpl()

    def close(self) -> None:
        """Close the connection and stop the event thread."""
        self._running = False
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            self._reconnect_task = None
        if self._wake_timer is not None:
            libvirt.virEventRemoveTimeout(self._wake_timer)
            self._wake_timer = None
        if self._connection is not None:
            self._release(self._connection)
            self._connection = None
        if self._event_thread is not None:
            self._event_thread.join(timeout=2)

    def _live(self) -> libvirt.virConnect:
        """The open connection; raises while there is none (lost, not yet re-established)."""
        if self._connection is None:
            raise HypervisorError("not connected to libvirt")
        return self._connection
