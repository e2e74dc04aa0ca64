"""TPM and NVRAM state: change facts from hosts, pulls, persistence and restores."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.types import (
    ContentHash,
    FencingToken,
    HostId,
    StateBlob,
    StateKind,
    VmId,
    VmName,
)


class StateChanged(Payload):
    """A VM's state changed on its host and has been stable; carries the hash, not the bytes."""

    message_type = "state.changed"

    vm_id: VmId = Field(description="The VM whose state changed.")
    host: HostId = Field(description="The host that holds it.")
    kind: StateKind = Field(description="TPM or NVRAM.")
    content_hash: ContentHash = Field(description="sha256 of the canonical content.")
    size: int = Field(ge=0, description="Length of the canonical content.")
    token: FencingToken = Field(description="Placement epoch and generation of this change.")


class FetchState(Payload):
    """Command to a host: reply with the current stable state of these VMs."""

    message_type = "state.fetch"

    vm_ids: list[VmId] = Field(min_length=1, max_length=256, description="VMs to fetch.")
    kinds: list[StateKind] = Field(
        default_factory=lambda: [StateKind.TPM, StateKind.NVRAM], description="Which kinds."
    )


class FetchedVmState(BaseModel):
    """One VM's blobs inside a :class:`StateFetched` reply."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    vm_id: VmId = Field(description="The VM.")
    blobs: list[StateBlob] = Field(description="Its stable blobs, one per kind it has.")


class StateFetched(Payload):
    """Reply to :class:`FetchState`: the blobs, and the VMs the host does not hold."""

    message_type = "state.fetched"

    vms: list[FetchedVmState] = Field(description="State of each VM the host holds.")
    missing: list[VmId] = Field(default_factory=list, description="VMs the host does not hold.")


class StatePersisted(Payload):
    """A version is durably stored; from now on it survives any single failure."""

    message_type = "state.persisted"

    vm_id: VmId = Field(description="The VM.")
    kind: StateKind = Field(description="TPM or NVRAM.")
    content_hash: ContentHash = Field(description="sha256 of the canonical content.")
    size: int = Field(ge=0, description="Length of the canonical content.")
    token: FencingToken = Field(description="The version's fencing token.")
    version: int = Field(ge=1, description="Sequence number of this version for the VM and kind.")
    host: HostId = Field(description="The host it came from.")


class StateWriteRefused(Payload):
    """Audit: the store refused a write (stale token, wrong host, bad hash)."""

    message_type = "state.refused"

    vm_id: VmId = Field(description="The VM.")
    kind: StateKind = Field(description="TPM or NVRAM.")
    host: str = Field(max_length=128, description="Who tried to write.")
    reason: str = Field(max_length=512, description="Why it was refused.")


class RetrieveState(Payload):
    """Command to the store: pull this VM's current state from its host now and persist it.

    Replied with ``CommandDone`` whose detail maps each kind to its newest stored version."""

    message_type = "state.retrieve"

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="The host to pull from (the VM's placement).")


class RestoreState(Payload):
    """Command to the store: send the stored state to a host in a ``vm.prepare``.

    Replied with the host's ``CommandDone``."""

    message_type = "state.restore"

    vm_id: VmId = Field(description="The VM.")
    name: VmName = Field(description="The domain name (names the NVRAM file on the host).")
    host: HostId = Field(description="The host the VM is about to start on.")
    epoch: int = Field(ge=1, description="The new placement epoch.")
