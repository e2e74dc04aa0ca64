"""An in-memory ``Hypervisor`` for unit tests of the host agent's command handlers.

It keeps domains as plain records and raises the agent's own errors where libvirt would
fail (``DomainNotFoundError`` for an unknown id), so handlers are tested without libvirt.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from keeper_host_agent.hypervisor.errors import DomainNotFoundError, TpmSecretUnreadableError
from keeper_host_agent.hypervisor.port import DomainSnapshot, LifecycleEvent
from keeper_shared.messages.types import TpmSecret
from keeper_shared.messages.vm import StopReason


@dataclass
class FakeDomain:
    """One domain as the fake keeps it."""

    vm_id: str
    name: str
    xml: str = "<domain/>"
    active: bool = True
    paused: bool = False
    snapshots: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    """namespace -> element XML."""
    stop_reason: StopReason = StopReason.UNKNOWN
    """Why it is off, while it is (libvirt's shut-off reason)."""

    def snapshot(self) -> DomainSnapshot:
        """As libvirt would read it."""
        reason = None if self.active else self.stop_reason
        return DomainSnapshot(self.vm_id, self.name, self.xml, self.active, reason)


class FakeHypervisor:
    """Domains in a dict; every call is recorded in ``calls`` as (operation, vm_id)."""

    def __init__(self, *domains: FakeDomain) -> None:
        self.domains = {domain.vm_id: domain for domain in domains}
        self.secrets: dict[str, TpmSecret] = {}
        """VM id -> the keeper's TPM secret defined for it."""
        self.calls: list[tuple[str, str]] = []
        self.memory_files: dict[tuple[str, str], Path] = {}
        """(VM id, snapshot) -> where its memory went."""

    def _get(self, operation: str, vm_id: str) -> FakeDomain:
        self.calls.append((operation, vm_id))
        domain = self.domains.get(vm_id)
        if domain is None:
            raise DomainNotFoundError(f"Domain not found: no domain with matching uuid '{vm_id}'")
        return domain

    def open(
        self,
        on_event: Callable[[LifecycleEvent], None],
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Nothing to connect to; no events ever come."""

    def close(self) -> None:
        """Nothing to close."""

    async def library_version(self) -> str:
        """A fixed version."""
        return "10.0.0"

    async def keeps_secrets(self) -> bool:
        """The fake keeps secrets."""
        return True

    async def capabilities_xml(self) -> str:
        """An x86_64 host whose libvirt emulates (no KVM), as the demo's hosts."""
        return (
            "<capabilities><guest><os_type>hvm</os_type><arch name='x86_64'>"
            "<domain type='qemu'/></arch></guest></capabilities>"
        )

    async def list_domains(self) -> list[DomainSnapshot]:
        """Every domain."""
        return [domain.snapshot() for domain in self.domains.values()]

    async def domain(self, vm_id: str) -> DomainSnapshot | None:
        """One domain, or None."""
        found = self.domains.get(vm_id)
        return None if found is None else found.snapshot()

    async def define_and_start(self, xml: str) -> None:
        """Define the domain from its `<uuid>` and `<name>` and run it."""
        root = ET.fromstring(xml)  # noqa: S314 - the test's own XML
        vm_id = (root.findtext("uuid") or "").lower()
        self.calls.append(("define_and_start", vm_id))
        self.domains[vm_id] = FakeDomain(vm_id, root.findtext("name") or "", xml)

    async def shutdown(self, vm_id: str, timeout_s: float) -> None:
        """The domain is off."""
        domain = self._get("shutdown", vm_id)
        domain.active, domain.stop_reason = False, StopReason.SHUTDOWN

    async def power_off(self, vm_id: str) -> None:
        """The domain is off."""
        domain = self._get("power_off", vm_id)
        domain.active, domain.stop_reason = False, StopReason.DESTROYED

    async def undefine(self, vm_id: str, *, keep_state: bool) -> None:
        """The domain is gone."""
        self._get("undefine", vm_id)
        del self.domains[vm_id]

    async def is_paused(self, vm_id: str) -> bool:
        """Whether the domain is paused."""
        return self._get("is_paused", vm_id).paused

    async def suspend(self, vm_id: str) -> None:
        """Pause the domain."""
        self._get("suspend", vm_id).paused = True

    async def resume(self, vm_id: str) -> None:
        """Let the domain run."""
        self._get("resume", vm_id).paused = False

    async def snapshot_names(self, vm_id: str) -> list[str]:
        """The domain's snapshots."""
        return list(self._get("snapshot_names", vm_id).snapshots)

    async def create_snapshot(
        self, vm_id: str, name: str, description: str, memory_file: Path
    ) -> None:
        """Add a snapshot; an active domain's names its memory file."""
        domain = self._get("create_snapshot", vm_id)
        domain.snapshots.append(name)
        if domain.active:
            self.memory_files[(vm_id, name)] = memory_file

    async def snapshot_xml(self, vm_id: str, name: str) -> str:
        """A snapshot document naming its memory file, as libvirt's would."""
        if name not in self._get("snapshot_xml", vm_id).snapshots:
            raise DomainNotFoundError(f"no snapshot {name}")
        memory = self.memory_files.get((vm_id, name))
        element = f"<memory snapshot='external' file='{memory}'/>" if memory else ""
        return f"<domainsnapshot><name>{name}</name>{element}</domainsnapshot>"

    async def revert_to_snapshot(
        self, domain_xml: str, snapshot_xml: str, name: str, metadata: tuple[str, str, str]
    ) -> None:
        """Define the domain, take the snapshot back from ``snapshot_xml`` when it lacks
        it, and run it with ``metadata``."""
        root = ET.fromstring(domain_xml)  # noqa: S314 - the test's own XML
        vm_id = (root.findtext("uuid") or "").lower()
        self.calls.append(("revert_to_snapshot", vm_id))
        known = self.domains.get(vm_id)
        snapshots = known.snapshots if known is not None else []
        if name not in snapshots:
            self.calls.append(("redefine_snapshot", vm_id))
            snapshots = [*snapshots, name]
        element, _prefix, namespace = metadata
        self.domains[vm_id] = FakeDomain(
            vm_id,
            root.findtext("name") or "",
            domain_xml,
            snapshots=snapshots,
            metadata={namespace: element},
        )

    async def delete_snapshot(self, vm_id: str, name: str) -> None:
        """Remove a snapshot."""
        self._get("delete_snapshot", vm_id).snapshots.remove(name)

    async def metadata(self, vm_id: str, namespace: str) -> str | None:
        """The metadata element in ``namespace``, or None."""
        return self._get("metadata", vm_id).metadata.get(namespace)

    async def set_metadata(self, vm_id: str, namespace: str, prefix: str, element: str) -> None:
        """Replace the metadata element in ``namespace``."""
        self._get("set_metadata", vm_id).metadata[namespace] = element

    async def define_tpm_secret(self, vm_id: str, secret: TpmSecret) -> bool:
        """Keep the secret."""
        self.secrets[vm_id] = secret
        return True

    async def remove_tpm_secret(self, vm_id: str) -> bool:
        """Drop the secret; False when there was none."""
        return self.secrets.pop(vm_id, None) is not None

    async def read_foreign_secret(self, vm_id: str, secret_uuid: str) -> TpmSecret | None:
        """Only the keeper's own secrets exist here."""
        if vm_id in self.secrets:
            return None
        raise TpmSecretUnreadableError(f"secret {secret_uuid} is not defined on this host")
