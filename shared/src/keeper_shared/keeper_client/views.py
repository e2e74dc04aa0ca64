"""What ``status`` and ``hosts`` show, and how a VM reference resolves: policy's and the
store's answers to their queries (``vms.list``, ``hosts.list``, ``state.describe``) put
together for tables and JSON. Nothing here reads a service's storage.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from keeper_shared.bus.client import CallError
from keeper_shared.keeper_client.client import KeeperClient
from keeper_shared.messages.adoption import UnprotectedVmView
from keeper_shared.messages.envelope import MessageError
from keeper_shared.messages.queries import HostView, StoredVmState, VmView
from keeper_shared.messages.template import TemplateView
from keeper_shared.messages.types import VM_NAME_PATTERN, StateKind


@dataclass(frozen=True)
class KindStatus:
    """The newest stored version of one kind."""

    version: int | None
    stored_at: float | None
    size: int | None

    def age_s(self, now: float) -> float | None:
        return None if self.stored_at is None else max(0.0, now - self.stored_at)


@dataclass(frozen=True)
class VmStatus:
    """One VM as policy and the store see it."""

    vm_id: str
    name: str | None
    guest_os: str | None
    host: str | None
    epoch: int
    kinds: dict[str, KindStatus]
    lost_from: str | None = None
    last_host: str | None = None
    tpm_encrypted: bool = False
    """swtpm encrypts the TPM state with the VM's libvirt secret (``--encrypt-state``)."""
    tpm_stranded: str | None = None
    """Why the TPM state cannot be used off its host (a secret the keeper cannot read)."""
    tpm_reset: str | None = None
    """Set while the stored TPM was replaced unasked and nobody accepted the new one."""
    tpm_reset_version: int | None = None

    def newest_stored_at(self) -> float | None:
        times = [k.stored_at for k in self.kinds.values() if k.stored_at is not None]
        return max(times) if times else None

    def protection(self) -> str:
        """`protected` (state stored), `unprotected` (nothing stored yet), `loss-recorded`
        (its host was declared lost while it ran there: it restarts from the recovery
        point), `stranded` (stored, but encrypted with a secret the keeper cannot read:
        useless on another host), `tpm-reset` (the stored TPM was replaced unasked; the VM's
        own is restored until `accept-tpm`)."""
        if self.lost_from:
            return "loss-recorded"
        if self.tpm_reset:
            return "tpm-reset"
        if self.tpm_stranded:
            return "stranded"
        if any(k.version is not None for k in self.kinds.values()):
            return "protected"
        return "unprotected"

    def as_json(self, now: float) -> dict[str, Any]:
        newest = self.newest_stored_at()
        return {
            "vm_id": self.vm_id,
            "name": self.name,
            "guest_os": self.guest_os,
            "host": self.host,
            "running": self.host is not None,
            "epoch": self.epoch,
            "protection": self.protection(),
            "newest_persisted_at": iso(newest),
            "newest_persisted_age_s": None if newest is None else round(now - newest, 1),
            "state": {
                kind: {
                    "version": status.version,
                    "persisted_at": iso(status.stored_at),
                    "age_s": None if status.stored_at is None else round(now - status.stored_at, 1),
                    "size": status.size,
                }
                for kind, status in self.kinds.items()
            },
            "lost_from": self.lost_from,
            "last_host": self.last_host,
            "tpm_encrypted": self.tpm_encrypted,
            "tpm_stranded": self.tpm_stranded,
            "tpm_reset": (
                None
                if self.tpm_reset is None
                else {"version": self.tpm_reset_version, "detail": self.tpm_reset}
            ),
        }


@dataclass(frozen=True)
class HostStatus:
    """One host as policy last heard from it."""

    host: str
    status: str
    last_seen: float | None
    cluster: str | None
    capabilities: dict[str, Any] = field(default_factory=dict)
    vms: int = 0

    def as_json(self, now: float) -> dict[str, Any]:
        data = asdict(self)
        data["last_seen"] = iso(self.last_seen)
        data["last_seen_age_s"] = None if self.last_seen is None else round(now - self.last_seen, 1)
        return data


def iso(timestamp: float | None) -> str | None:
    """A timestamp as local ISO 8601 text to the second; None stays None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def vm_status_from(view: VmView, stored: StoredVmState | None) -> VmStatus:
    """One VM from policy's view of it and what the store holds. A version whose metadata
    the store cannot read shows when policy heard it was persisted."""
    kinds: dict[str, KindStatus] = {}
    for kind in StateKind:
        newest = stored.newest.get(kind) if stored is not None else None
        if newest is None:
            kinds[kind.value] = KindStatus(version=None, stored_at=None, size=None)
            continue
        stored_at = newest.stored_at.timestamp() if newest.stored_at is not None else None
        persisted = view.persisted.get(kind)
        if stored_at is None and persisted is not None:
            stored_at = persisted.persisted_at.timestamp()
        kinds[kind.value] = KindStatus(
            version=newest.version, stored_at=stored_at, size=newest.size
        )
    return VmStatus(
        vm_id=view.vm_id,
        name=view.name,
        guest_os=view.guest_os,
        host=view.host,
        epoch=view.epoch,
        kinds=kinds,
        lost_from=view.lost_from,
        last_host=view.last_host,
        tpm_encrypted=view.tpm_encrypted,
        tpm_stranded=view.tpm_stranded,
        tpm_reset=view.tpm_reset,
        tpm_reset_version=view.tpm_reset_version,
    )


async def vm_statuses(client: KeeperClient, reference: str | None = None) -> list[VmStatus]:
    """Every registered VM (or those ``reference`` names), by name, with its newest stored
    state."""
    views = await client.list_vms(reference)
    if not views:
        return []
    stored = await client.describe_stored_state([view.vm_id for view in views])
    by_vm = {item.vm_id: item for item in stored}
    return [vm_status_from(view, by_vm.get(view.vm_id)) for view in views]


async def vm_status(client: KeeperClient, vm_id: str) -> VmStatus | None:
    """One VM by id, None when policy has not registered it."""
    found = [item for item in await vm_statuses(client, vm_id) if item.vm_id == vm_id]
    return found[0] if found else None


async def resolve_vm(client: KeeperClient, reference: str) -> list[str]:
    """The ids of the VMs ``reference`` names (a VM id, or a domain name, which several
    VMs may share); empty when none. A VM id also names a VM that is not registered but has
    stored state (imported or cloned for a VM to be registered later), unless the id is a
    template's: its stored NVRAM is the template's, which no VM command may touch."""
    if not re.fullmatch(VM_NAME_PATTERN, reference):
        return []  # neither an id nor a domain name: nothing can be registered under it
    views = await client.list_vms(reference)
    try:
        vm_id = str(uuid.UUID(reference))
    except ValueError:
        vm_id = None
    if vm_id is not None and all(view.vm_id != vm_id for view in views):
        (stored,) = await client.describe_stored_state([vm_id])
        if (stored.has_data_key or stored.newest) and await template_named(client, vm_id) is None:
            return [vm_id]
    return [view.vm_id for view in views]


async def template_named(
    client: KeeperClient, reference: str, *, strict: bool = False
) -> TemplateView | None:
    """The template ``reference`` (a name or a template id) names, or None. Unless
    ``strict``, a policy that cannot answer (one released before templates) counts as
    having none, so a VM command's "unknown VM" is not turned into another failure."""
    try:
        templates = await client.list_templates()
    except (CallError, MessageError):
        if strict:
            raise
        return None
    found = [item for item in templates if reference in (item.name, item.template_id)]
    return found[0] if found else None


def host_status_from(view: HostView) -> HostStatus:
    """One host from policy's view of it."""
    return HostStatus(
        host=view.host,
        status=view.liveness.value,
        last_seen=view.last_seen.timestamp(),
        cluster=view.cluster,
        capabilities=view.capabilities.model_dump(mode="json"),
        vms=view.vms,
    )


async def host_statuses(client: KeeperClient) -> list[HostStatus]:
    """Every host that ever sent a heartbeat: alive, silent (no heartbeat for a while,
    not yet declared lost) or lost, by policy's rule."""
    return [host_status_from(view) for view in (await client.list_hosts()).hosts]


NOT_ADOPTED = "not-adopted"
"""The protection of a TPM/UEFI domain a host reported that vTPM Keeper did not adopt."""


def unprotected_json(view: UnprotectedVmView) -> dict[str, Any]:
    """A domain that is not adopted, in the shape of a VM's status where the two meet."""
    return {
        "vm_id": view.vm_id,
        "name": view.name,
        "host": view.host,
        "running": view.running,
        "protection": NOT_ADOPTED,
        "reasons": list(view.reasons),
        "reported_at": iso(view.reported_at.timestamp()),
    }


def names(view: UnprotectedVmView, reference: str) -> bool:
    """Whether ``reference`` (a VM id or a domain name) names ``view``'s domain."""
    return reference in (view.vm_id, view.name)
