"""``Hypervisor`` on libvirt: every operation the agent uses, on the kept-open connection.

Blocking libvirt calls run in worker threads (a libvirt connection is thread-safe) so the
asyncio loop never stalls, and each comes back with libvirt's errors turned into the
agent's (``libvirt_errors``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import libvirt

from keeper_host_agent.hypervisor.errors import (
    DomainNotFoundError,
    HypervisorError,
    InvalidArgumentError,
    MetadataNotFoundError,
    UnsupportedError,
)
from keeper_host_agent.hypervisor.libvirt_connection import LibvirtConnection
from keeper_host_agent.hypervisor.libvirt_errors import translating
from keeper_host_agent.hypervisor.libvirt_memory_snapshots import (
    create_memory_snapshot,
    delete_memory_snapshot,
    revert_with_memory,
    snapshot_xml,
)
from keeper_host_agent.hypervisor.libvirt_secrets import (
    define_tpm_secret,
    read_foreign_secret,
    remove_tpm_secret,
)
from keeper_host_agent.hypervisor.port import DomainSnapshot
from keeper_shared.messages.types import TpmSecret
from keeper_shared.messages.vm import StopReason

_T = TypeVar("_T")


_SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: StopReason.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: StopReason.DESTROYED,
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: StopReason.CRASHED,
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: StopReason.MIGRATED,
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: StopReason.SAVED,
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: StopReason.FAILED,
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: StopReason.FROM_SNAPSHOT,
}
"""libvirt's reasons for a domain being off; any other (unknown, the daemon's own) is
`unknown`."""


def _snapshot(domain: libvirt.virDomain) -> DomainSnapshot:
    active = bool(domain.isActive())
    reason: StopReason | None = None
    if not active:
        _state, detail = domain.state()
        reason = _SHUTOFF_REASONS.get(detail, StopReason.UNKNOWN)
    return DomainSnapshot(
        vm_id=domain.UUIDString().lower(),
        name=domain.name(),
        xml=domain.XMLDesc(0),
        active=active,
        shutoff_reason=reason,
    )


class LibvirtHypervisor(LibvirtConnection):
    """The agent's ``Hypervisor``: one libvirt connection (reconnected when the daemon goes
    away, see ``LibvirtConnection``) and the operations on it."""

    async def _call(self, operation: Callable[[libvirt.virConnect], _T]) -> _T:
        """Run ``operation`` on the live connection in a worker thread."""
        connection = self._live()
        with translating():
            return await asyncio.to_thread(operation, connection)

    async def _on_domain(self, vm_id: str, operation: Callable[[libvirt.virDomain], _T]) -> _T:
        """Run ``operation`` on domain ``vm_id`` in a worker thread."""
        return await self._call(lambda connection: operation(connection.lookupByUUIDString(vm_id)))

    async def library_version(self) -> str:
        """libvirt's version as `major.minor.micro`."""
        with translating():
            number = await asyncio.to_thread(libvirt.getVersion)
        return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"

    async def keeps_secrets(self) -> bool:
        """Whether this libvirt keeps secrets (has a secret driver; ``test:///`` has none)."""
        try:
            await self._call(lambda connection: connection.listAllSecrets(0))
        except UnsupportedError:
            return False
        return True

    async def capabilities_xml(self) -> str:
        """libvirt's capabilities document: guest architectures and their domain types."""
        return await self._call(lambda connection: str(connection.getCapabilities()))

    async def list_domains(self) -> list[DomainSnapshot]:
        """Every domain (running or not) with its XML."""
        return await self._call(
            lambda connection: [_snapshot(domain) for domain in connection.listAllDomains(0)]
        )

    async def domain(self, vm_id: str) -> DomainSnapshot | None:
        """One domain, or None when this host does not have it."""
        try:
            return await self._on_domain(vm_id, _snapshot)
        except DomainNotFoundError:
            return None

    async def define_and_start(self, xml: str) -> None:
        """Define (or redefine) the domain from ``xml`` and start it."""
        await self._call(lambda connection: connection.defineXML(xml).create())

    async def shutdown(self, vm_id: str, timeout_s: float) -> None:
        """Ask the guest to shut down and wait until the domain is off."""

        def run(domain: libvirt.virDomain) -> None:
            if domain.isActive():
                domain.shutdown()
            deadline = time.monotonic() + timeout_s
            while domain.isActive():
                if time.monotonic() > deadline:
                    raise HypervisorError(f"guest did not shut down within {timeout_s:.0f} s")
                time.sleep(0.1)

        await self._on_domain(vm_id, run)

    async def power_off(self, vm_id: str) -> None:
        """Stop the domain at once (libvirt's ``destroy``)."""

        def run(domain: libvirt.virDomain) -> None:
            if domain.isActive():
                domain.destroy()

        await self._on_domain(vm_id, run)

    async def undefine(self, vm_id: str, *, keep_state: bool) -> None:
        """Remove the domain; libvirt also removes its TPM and NVRAM unless told to keep them.

        Drivers that keep no such state (``test:///``) refuse the flags; the plain undefine
        is then the same thing, and the caller wipes any local files itself.
        """

        def run(domain: libvirt.virDomain) -> None:
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
                with translating():
                    domain.undefineFlags(flags | always)
            except (InvalidArgumentError, UnsupportedError):
                domain.undefineFlags(always)

        await self._on_domain(vm_id, run)

    async def is_paused(self, vm_id: str) -> bool:
        """Whether the domain is paused."""
        state, _reason = await self._on_domain(vm_id, lambda domain: domain.state())
        return bool(state == libvirt.VIR_DOMAIN_PAUSED)

    async def suspend(self, vm_id: str) -> None:
        """Pause the running domain."""
        await self._on_domain(vm_id, lambda domain: domain.suspend())

    async def resume(self, vm_id: str) -> None:
        """Let the paused domain run."""
        await self._on_domain(vm_id, lambda domain: domain.resume())

    async def snapshot_names(self, vm_id: str) -> list[str]:
        """The names of the domain's libvirt snapshots."""
        names = await self._on_domain(vm_id, lambda domain: domain.snapshotListNames())
        return [str(name) for name in names]

    async def create_snapshot(
        self, vm_id: str, name: str, description: str, memory_file: Path
    ) -> None:
        """See ``libvirt_memory_snapshots.create_memory_snapshot``."""
        await self._on_domain(
            vm_id,
            lambda domain: create_memory_snapshot(domain, name, description, memory_file),
        )

    async def snapshot_xml(self, vm_id: str, name: str) -> str:
        """The snapshot's XML, secure details included."""
        return await self._on_domain(vm_id, lambda domain: snapshot_xml(domain, name))

    async def revert_to_snapshot(
        self, domain_xml: str, snapshot_xml: str, name: str, metadata: tuple[str, str, str]
    ) -> None:
        """See ``libvirt_memory_snapshots.revert_with_memory``."""
        await self._call(
            lambda connection: revert_with_memory(
                connection, domain_xml, snapshot_xml, name, metadata
            )
        )

    async def delete_snapshot(self, vm_id: str, name: str) -> None:
        """See ``libvirt_memory_snapshots.delete_memory_snapshot``."""
        await self._on_domain(vm_id, lambda domain: delete_memory_snapshot(domain, name))

    async def metadata(self, vm_id: str, namespace: str) -> str | None:
        """The domain's `<metadata>` element in ``namespace``; None when it has none."""

        def read(domain: libvirt.virDomain) -> str:
            return str(domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, 0))

        try:
            return await self._on_domain(vm_id, read)
        except MetadataNotFoundError:
            return None

    async def set_metadata(self, vm_id: str, namespace: str, prefix: str, element: str) -> None:
        """Write ``element`` in ``namespace``, in the running domain (when it runs) and in its
        persistent definition (when it has one)."""

        def write(domain: libvirt.virDomain) -> None:
            flags = 0
            if domain.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            if domain.isPersistent():
                flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
            domain.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, prefix, namespace, flags
            )

        await self._on_domain(vm_id, write)

    async def define_tpm_secret(self, vm_id: str, secret: TpmSecret) -> bool:
        """See ``libvirt_secrets.define_tpm_secret``."""
        return await self._call(lambda connection: define_tpm_secret(connection, vm_id, secret))

    async def remove_tpm_secret(self, vm_id: str) -> bool:
        """See ``libvirt_secrets.remove_tpm_secret``."""
        return await self._call(lambda connection: remove_tpm_secret(connection, vm_id))

    async def read_foreign_secret(self, vm_id: str, secret_uuid: str) -> TpmSecret | None:
        """See ``libvirt_secrets.read_foreign_secret``."""
        return await self._call(
            lambda connection: read_foreign_secret(connection, vm_id, secret_uuid)
        )
