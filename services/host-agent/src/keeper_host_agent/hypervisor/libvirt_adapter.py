"""The agent's only door to libvirt: lifecycle events bridged into asyncio, and operations.

libvirt delivers events from its own event loop, which must run in a thread of ours; each
event is handed to the asyncio loop with ``call_soon_threadsafe``. Blocking libvirt calls run
in worker threads (a libvirt connection is thread-safe) so the asyncio loop never stalls.

A connection to a daemon (``qemu:///system``) dies when libvirtd restarts. libvirt says so
through the connection's close callback; the agent then reconnects with a growing backoff,
registers its callbacks on the new connection and lets its owner re-read every domain,
because lifecycle events that happened in between were never delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import structlog

from keeper_shared.messages.vm import StopReason

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

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


class HypervisorError(RuntimeError):
    """A libvirt operation failed; the message is libvirt's (it never holds state bytes)."""


@dataclass(frozen=True)
class LifecycleEvent:
    """One libvirt lifecycle event, reduced to what the agent acts on."""

    vm_id: str
    name: str
    event: str
    """defined, undefined, started, suspended, resumed or stopped."""
    stop_reason: StopReason | None


@dataclass(frozen=True)
class DomainSnapshot:
    """A domain's XML and whether it runs, read in one go."""

    vm_id: str
    name: str
    xml: str
    active: bool


class LibvirtHypervisor:
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
            raise HypervisorError(f"cannot connect to {self._uri}: {error}") from None
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
            raise HypervisorError(f"cannot watch {self._uri}: {error}") from None
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

    @property
    def connection(self) -> libvirt.virConnect:
        """The live libvirt connection, for command modules that need more than the
        operations below (raises while disconnected)."""
        return self._conn

    @property
    def _conn(self) -> libvirt.virConnect:
        if self._connection is None:
            raise HypervisorError("not connected to libvirt")
        return self._connection

    async def list_domains(self) -> list[DomainSnapshot]:
        """Every domain (running or not) with its XML."""

        def read() -> list[DomainSnapshot]:
            return [
                DomainSnapshot(
                    vm_id=domain.UUIDString().lower(),
                    name=domain.name(),
                    xml=domain.XMLDesc(0),
                    active=bool(domain.isActive()),
                )
                for domain in self._conn.listAllDomains(0)
            ]

        return await self._call(read)

    async def domain(self, vm_id: str) -> DomainSnapshot | None:
        """One domain, or None when this host does not have it."""

        def read() -> DomainSnapshot | None:
            try:
                domain = self._conn.lookupByUUIDString(vm_id)
            except libvirt.libvirtError as error:
                if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            return DomainSnapshot(vm_id, domain.name(), domain.XMLDesc(0), bool(domain.isActive()))

        return await self._call(read)

    async def define_and_start(self, xml: str) -> None:
        """Define (or redefine) the domain from ``xml`` and start it."""

        def run() -> None:
            self._conn.defineXML(xml).create()

        await self._call(run)

    async def shutdown(self, vm_id: str, timeout_s: float) -> None:
        """Ask the guest to shut down and wait until the domain is off."""

        def run() -> None:
            domain = self._conn.lookupByUUIDString(vm_id)
            if domain.isActive():
                domain.shutdown()
            deadline = time.monotonic() + timeout_s
            while domain.isActive():
                if time.monotonic() > deadline:
                    raise HypervisorError(f"guest did not shut down within {timeout_s:.0f} s")
                time.sleep(0.1)

        await self._call(run)

    async def power_off(self, vm_id: str) -> None:
        """Stop the domain at once (libvirt's ``destroy``)."""

        def run() -> None:
            domain = self._conn.lookupByUUIDString(vm_id)
            if domain.isActive():
                domain.destroy()

        await self._call(run)

    async def undefine(self, vm_id: str, *, keep_state: bool) -> None:
        """Remove the domain; libvirt also removes its TPM and NVRAM unless told to keep them.

        Drivers that keep no such state (``test:///``) refuse the flags; the plain undefine
        is then the same thing, and the caller wipes any local files itself.
        """

        def run() -> None:
            domain = self._conn.lookupByUUIDString(vm_id)
            # Snapshot metadata would make libvirt refuse to undefine; the snapshots the
            # keeper took are pinned in the store, not in libvirt.
            always = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            if keep_state:
                flags = (
                    libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM
                )
            else:
                flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_TPM
            try:
                domain.undefineFlags(flags | always)
            except libvirt.libvirtError as error:
                if error.get_error_code() not in (
                    libvirt.VIR_ERR_INVALID_ARG,
                    libvirt.VIR_ERR_NO_SUPPORT,
                ):
                    raise
                domain.undefineFlags(always)

        await self._call(run)

    async def keeps_secrets(self) -> bool:
        """Whether this libvirt keeps secrets (has a secret driver; ``test:///`` has none)."""

        def probe() -> bool:
            try:
                self._conn.listAllSecrets(0)
            except libvirt.libvirtError as error:
                if error.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                    return False
                raise
            return True

        return await self._call(probe)

    async def library_version(self) -> str:
        """libvirt's version as `major.minor.micro`."""
        number = await asyncio.to_thread(libvirt.getVersion)
        return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"

    async def _call(self, function: Callable[[], _T]) -> _T:
        try:
            return await asyncio.to_thread(function)
        except libvirt.libvirtError as error:
            raise HypervisorError(str(error)) from None
