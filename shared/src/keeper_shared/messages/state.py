"""TPM and NVRAM state: change facts from hosts, pulls, persistence and restores."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from keeper_shared.messages.envelope import Payload, register_downcaster, register_upcaster
from keeper_shared.messages.sealed import SealedStateBlob, SealedTpmSecret
from keeper_shared.messages.snapshot import SnapshotId
from keeper_shared.messages.types import (
    ContentHash,
    FencingToken,
    HostId,
    StateBlob,
    StateKind,
    TpmSecret,
    VmId,
    VmName,
)

MAX_VMS_PER_MESSAGE = 256
"""Most VMs one ``state.changed`` announces or one ``state.fetch`` names."""


class StateChange(BaseModel):
    """One VM's state that changed on its host and has been stable, inside a
    :class:`StateChanged`: its hash, and the state itself sealed to the store when it is
    small enough to travel inline (else the store fetches it)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    vm_id: VmId = Field(description="The VM whose state changed.")
    kind: StateKind = Field(description="TPM or NVRAM.")
    content_hash: ContentHash = Field(description="sha256 of the canonical content.")
    size: int = Field(ge=0, description="Length of the canonical content.")
    token: FencingToken = Field(description="Placement epoch and generation of this change.")
    sealed: SealedStateBlob | None = Field(
        default=None,
        description="The announced content itself, sealed to the store's key exactly as in a "
        "`state.fetched` reply, so the store stores it without a fetch; None when it did "
        "not fit the host's inline budget, or the VM's TPM state is encrypted with a secret "
        "the keeper did not create (the fetch ships that secret too): the store fetches it.",
    )

    @model_validator(mode="after")
    def _sealed_is_this_change(self) -> StateChange:
        """An inline blob is the version announced, not another one."""
        sealed = self.sealed
        if sealed is not None and (
            sealed.kind is not self.kind
            or sealed.content_hash != self.content_hash
            or sealed.size != self.size
            or sealed.token != self.token
        ):
            raise ValueError("the inline blob's kind, hash, size or token is not the change's")
        return self


class StateChanged(Payload):
    """States of a host's VMs changed and have been stable: every change the host found
    while its previous announcement was on its way, in one event (one message per VM was
    two broker hops per stored version, the pipeline's largest cost at TPM size)."""

    message_type = "state.changed"
    schema_version = 3

    host: HostId = Field(description="The host that holds the VMs.")
    changes: list[StateChange] = Field(
        min_length=1, max_length=MAX_VMS_PER_MESSAGE, description="The changes, by VM."
    )


@register_upcaster(StateChanged.message_type, 1)
def _state_changed_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 announced one VM's change per event, with the host beside it."""
    change = {key: value for key, value in data.items() if key != "host"}
    return {"host": data.get("host"), "changes": [change]}


@register_upcaster(StateChanged.message_type, 2)
def _state_changed_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v2 announced hashes only: nothing travels inline, the store fetches every change."""
    return data


@register_downcaster(StateChanged.message_type, 3)
def _state_changed_v3_as_v2(data: dict[str, Any]) -> dict[str, Any]:
    """To a store of release 0.1.0: the hashes alone (it fetches each change as before)."""
    changes = data.get("changes", [])
    return {
        **data,
        "changes": [
            {name: value for name, value in change.items() if name != "sealed"}
            for change in changes
        ],
    }


class FetchState(Payload):
    """Command to a host: reply with the current stable state of these VMs."""

    message_type = "state.fetch"

    vm_ids: list[VmId] = Field(
        min_length=1, max_length=MAX_VMS_PER_MESSAGE, description="VMs to fetch."
    )
    kinds: list[StateKind] = Field(
        default_factory=lambda: [StateKind.TPM, StateKind.NVRAM], description="Which kinds."
    )


class FetchedVmState(BaseModel):
    """One VM's blobs as the host read them and the store writes them (never on the bus:
    it travels as a :class:`SealedVmState`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    vm_id: VmId = Field(description="The VM.")
    blobs: list[StateBlob] = Field(description="Its stable blobs, one per kind it has.")
    tpm_secret: TpmSecret | None = Field(
        default=None,
        description="The libvirt secret its TPM state is encrypted with, when the domain names "
        "one the keeper did not create and libvirt lets the host read it (not private).",
    )


class SealedVmState(BaseModel):
    """One VM's blobs inside a :class:`StateFetched` reply, sealed to the store's key; the
    store opens it into a :class:`FetchedVmState`."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    vm_id: VmId = Field(description="The VM.")
    blobs: list[SealedStateBlob] = Field(description="Its stable blobs, one per kind it has.")
    tpm_secret: SealedTpmSecret | None = Field(
        default=None,
        description="The libvirt secret its TPM state is encrypted with, when the domain names "
        "one the keeper did not create and libvirt lets the host read it (not private).",
    )


class StateFetched(Payload):
    """Reply to :class:`FetchState`: the blobs, sealed to the store, and the VMs the host
    does not hold.

    v3 seals every blob and secret; v1 and v2 carried them in clear and are refused (no
    upcaster: clear state is not accepted off the bus)."""

    message_type = "state.fetched"
    schema_version = 3

    vms: list[SealedVmState] = Field(description="State of each VM the host holds.")
    missing: list[VmId] = Field(default_factory=list, description="VMs the host does not hold.")


class StatePersisted(Payload):
    """A version is durably stored; from now on it survives any single failure."""

    message_type = "state.persisted"
    schema_version = 2

    vm_id: VmId = Field(description="The VM.")
    kind: StateKind = Field(description="TPM or NVRAM.")
    content_hash: ContentHash = Field(description="sha256 of the canonical content.")
    size: int = Field(ge=0, description="Length of the canonical content.")
    token: FencingToken = Field(description="The version's fencing token.")
    version: int = Field(ge=1, description="Sequence number of this version for the VM and kind.")
    host: HostId = Field(description="The host it came from.")
    tpm_profile: str | None = Field(
        default=None,
        max_length=32,
        description="A TPM version's libtpms profile (`null` for state libtpms 0.9 or older "
        "made); None for NVRAM and when the state could not be read (encrypted with a secret "
        "the store does not hold).",
    )
    state_format_level: int | None = Field(
        default=None,
        ge=1,
        description="The libtpms StateFormatLevel that profile needs: a host whose libtpms "
        "implements a lower level cannot load this state. None exactly when tpm_profile is.",
    )


@register_upcaster(StatePersisted.message_type, 1)
def _persisted_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 predates the profile: unknown (policy keeps the level it knew for the VM)."""
    return data


class StateWriteRefused(Payload):
    """Audit: the store refused a write (stale token, wrong host, bad hash)."""

    message_type = "state.refused"

    vm_id: VmId = Field(description="The VM.")
    kind: StateKind = Field(description="TPM or NVRAM.")
    host: str = Field(max_length=128, description="Who tried to write.")
    reason: str = Field(max_length=512, description="Why it was refused.")


class RetrieveState(Payload):
    """Command to the store: pull this VM's current state from its host now and persist it.

    Replied with ``RetrieveStateReply``: the newest stored version of each kind."""

    message_type = "state.retrieve"

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="The host to pull from (the VM's placement).")


class RestoreState(Payload):
    """Command to the store: send stored state to a host in a ``vm.prepare``.

    By default the newest version of each kind; ``versions`` or ``snapshot_id`` choose
    others. Every version sent is decrypted, decompressed and hash-checked first. Replied
    with ``RestoreStateReply`` (the versions sent, the TPM secret's UUID), or its failure:
    the host's refusal, or the store's own."""

    message_type = "state.restore"
    schema_version = 2

    vm_id: VmId = Field(description="The VM.")
    name: VmName = Field(description="The domain name (names the NVRAM file on the host).")
    host: HostId = Field(description="The host the VM is about to start on.")
    epoch: int = Field(ge=1, description="The new placement epoch.")
    versions: dict[StateKind, Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        description="Version to send per kind; a kind not named gets its newest version.",
    )
    snapshot_id: SnapshotId | None = Field(
        default=None, description="Send the versions this snapshot pinned (not with versions)."
    )
    allow_older: bool = Field(
        default=False,
        description="Allow a version older than the newest stored one: that rolls the VM's "
        "TPM back, so it must be asked for.",
    )
    encrypt_tpm_state: bool = Field(
        default=False,
        description="The VM's TPM state is to be encrypted: the store creates the VM's "
        "libvirt secret if it holds none yet. A secret the store holds is sent either way; "
        "its UUID is the reply's `tpm_secret_uuid`.",
    )

    @model_validator(mode="after")
    def _one_choice(self) -> RestoreState:
        if self.versions is not None and self.snapshot_id is not None:
            raise ValueError("versions and snapshot_id are mutually exclusive")
        return self


@register_upcaster(RestoreState.message_type, 1)
def _restore_state_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 predates ``encrypt_tpm_state``: no secret was ever created for it."""
    return data


class ListStateHistory(Payload):
    """Command to the store: list every kept version of a VM's state.

    Replied with :class:`StateHistory`."""

    message_type = "state.history"

    vm_id: VmId = Field(description="The VM.")


class VersionOrigin(enum.StrEnum):
    """How a version came to be stored."""

    HOST = "host"
    """Pulled from the host the VM ran on."""
    CLONE = "clone"
    """Copied from another VM by ``vm.clone``."""
    IMPORT = "import"
    """Taken from an exported bundle by ``state.import``."""


class StateVersionInfo(BaseModel):
    """One kept version inside a :class:`StateHistory` (metadata only, never bytes)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    version: int = Field(ge=1, description="Sequence number for the VM and kind.")
    content_hash: ContentHash = Field(description="sha256 of the canonical content.")
    size: int = Field(ge=0, description="Length of the canonical content.")
    token: FencingToken = Field(description="Placement epoch and generation it was written at.")
    host: HostId | None = Field(description="The host it came from; None for clones, imports.")
    origin: VersionOrigin = Field(description="How it was stored.")
    source_vm_id: VmId | None = Field(
        default=None, description="The VM it was cloned or exported from, if any."
    )
    stored_at: datetime = Field(description="When the store wrote it (UTC).")
    swtpm_version: str | None = Field(
        default=None, description="swtpm version of the host that read it, when known."
    )
    tpm_profile: str | None = Field(
        default=None, max_length=32, description="A TPM version's libtpms profile, when known."
    )
    state_format_level: int | None = Field(
        default=None, ge=1, description="The libtpms StateFormatLevel it needs, when known."
    )
    in_history: bool = Field(
        description="Within the last N versions; False when only a snapshot keeps it."
    )
    snapshots: list[SnapshotId] = Field(
        default_factory=list, description="Snapshots that pin this version."
    )
    flags: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="The scrubber's last record for this version, as it stored it (a JSON "
        "object: ok, reason, ek_changed, previous_good_version, ...); empty when never "
        "scrubbed.",
    )


class KindHistory(BaseModel):
    """The kept versions of one kind inside a :class:`StateHistory`."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    kind: StateKind = Field(description="TPM or NVRAM.")
    head_version: int | None = Field(description="The newest version; None when none stored.")
    versions: list[StateVersionInfo] = Field(description="Kept versions, oldest first.")


class StateHistory(Payload):
    """Reply to :class:`ListStateHistory`."""

    message_type = "state.history-listed"

    vm_id: VmId = Field(description="The VM.")
    kinds: list[KindHistory] = Field(description="One entry per kind, TPM first.")
