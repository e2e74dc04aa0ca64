"""The host agent's only interface to the hypervisor: what it asks of libvirt, no more.

``LibvirtHypervisor`` implements it on a real connection; tests give command handlers an
in-memory one. Every operation raises ``HypervisorError`` (or a subclass, see ``errors``)
when it fails, never a libvirt exception.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from keeper_shared.messages.types import TpmSecret
from keeper_shared.messages.vm import StopReason


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
    shutoff_reason: StopReason | None = None
    """Why an inactive domain is off, as libvirt keeps it (`unknown` when it kept nothing);
    None while it runs."""


class Hypervisor(Protocol):
    """The operations the host agent uses on this host's hypervisor."""

    def open(
        self,
        on_event: Callable[[LifecycleEvent], None],
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Connect and deliver lifecycle events to ``on_event`` on the running loop;
        ``on_reconnect`` runs after each re-established connection (events in between are
        lost, so it re-reads the view)."""
        ...

    def close(self) -> None:
        """Disconnect and stop delivering events."""
        ...

    async def library_version(self) -> str:
        """The hypervisor library's version as `major.minor.micro`."""
        ...

    async def keeps_secrets(self) -> bool:
        """Whether the hypervisor keeps secrets (swtpm can encrypt TPM state with one)."""
        ...

    async def capabilities_xml(self) -> str:
        """The hypervisor's capabilities document (libvirt's ``virsh capabilities``)."""
        ...

    async def list_domains(self) -> list[DomainSnapshot]:
        """Every domain (running or not) with its XML."""
        ...

    async def domain(self, vm_id: str) -> DomainSnapshot | None:
        """One domain, or None when this host does not have it."""
        ...

    async def define_and_start(self, xml: str) -> None:
        """Define (or redefine) the domain from ``xml`` and start it."""
        ...

    async def shutdown(self, vm_id: str, timeout_s: float) -> None:
        """Ask the guest to shut down and wait until the domain is off."""
        ...

    async def power_off(self, vm_id: str) -> None:
        """Stop the domain at once."""
        ...

    async def undefine(self, vm_id: str, *, keep_state: bool) -> None:
        """Remove the domain, with its TPM and NVRAM state unless ``keep_state``."""
        ...

    async def is_paused(self, vm_id: str) -> bool:
        """Whether the domain is paused."""
        ...

    async def suspend(self, vm_id: str) -> None:
        """Pause the running domain."""
        ...

    async def resume(self, vm_id: str) -> None:
        """Let the paused domain run."""
        ...

    async def snapshot_names(self, vm_id: str) -> list[str]:
        """The names of the domain's snapshots."""
        ...

    async def create_snapshot(
        self, vm_id: str, name: str, description: str, memory_file: Path
    ) -> None:
        """Snapshot the domain as it is; when it runs (or is paused) its memory goes to
        ``memory_file``."""
        ...

    async def snapshot_xml(self, vm_id: str, name: str) -> str:
        """The snapshot's XML, secure details included (what a redefine needs)."""
        ...

    async def revert_to_snapshot(
        self, domain_xml: str, snapshot_xml: str, name: str, metadata: tuple[str, str, str]
    ) -> None:
        """Define the domain from ``domain_xml``, redefine snapshot ``name`` from
        ``snapshot_xml`` when the domain lacks it, and revert to it with its memory; the
        reverted domain runs with ``metadata`` (element, prefix, namespace) written, while
        it was still paused, in place of what the snapshot had (its placement epoch: so the
        state it announces carries the new one). The domain must be off."""
        ...

    async def delete_snapshot(self, vm_id: str, name: str) -> None:
        """Delete the domain's snapshot ``name`` (its external memory file is the caller's
        to remove)."""
        ...

    async def metadata(self, vm_id: str, namespace: str) -> str | None:
        """The domain's `<metadata>` element in ``namespace`` as XML; None when absent."""
        ...

    async def set_metadata(self, vm_id: str, namespace: str, prefix: str, element: str) -> None:
        """Write ``element`` as the domain's metadata in ``namespace`` (under ``prefix``),
        in the running domain and in its persistent definition."""
        ...

    async def define_tpm_secret(self, vm_id: str, secret: TpmSecret) -> bool:
        """Make ``secret`` available to swtpm for ``vm_id``; False when it already was,
        defined by someone else. Raises ``TpmSecretError`` when it cannot be."""
        ...

    async def remove_tpm_secret(self, vm_id: str) -> bool:
        """Remove the keeper's TPM secret of ``vm_id``; False when there is none."""
        ...

    async def read_foreign_secret(self, vm_id: str, secret_uuid: str) -> TpmSecret | None:
        """The value of a secret the domain's TPM names that the keeper did not define (None
        when it did). Raises ``TpmSecretUnreadableError`` when private or missing."""
        ...
