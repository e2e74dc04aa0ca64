"""Every command of the bus: who takes it, what it is answered, which events follow it.

This table is the one place the AsyncAPI document learns a message is a command; any
message not named here (and not a reply of one) is documented as an event. The unit tests
fail when a message that reads like an imperative is missing here, so a new command cannot
reach the document without its reply.

"Follow-up events" are the facts published because the command was carried out, by its
receiver or by the services it commands on the way (a ``vm.place`` makes the host start
the domain, so the host's ``vm.defined`` and ``vm.started`` follow it). They may come
before or after the reply, and only those the outcome calls for are sent (``tpm.enable``
is followed by ``tpm.approved`` or ``tpm.rejected``). The ongoing protection (a running
VM's ``state.changed`` and ``state.persisted``, heartbeats) is not listed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from keeper_shared.messages.adoption import (
    AdoptVm,
    ListUnprotectedVms,
    UnprotectedVmsListed,
    VmAdopted,
    VmAdoptionResult,
)
from keeper_shared.messages.commands import CommandRejected
from keeper_shared.messages.deletion import DeleteState, DisableTpm, StateDeleted, TpmDisabled
from keeper_shared.messages.endorsement import EndorsementKeyRead, ReadEndorsementKey
from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.host_requests import (
    ClaimPlacement,
    NewestState,
    PlacementClaimed,
    ReadNewestState,
)
from keeper_shared.messages.placement import PlaceVm, StateLossRecorded, StopVm, VmPlaced, VmRetired
from keeper_shared.messages.queries import (
    DescribeStoredState,
    HostsListed,
    ListHosts,
    ListVms,
    StoredStateDescribed,
    VmsListed,
)
from keeper_shared.messages.replies import (
    AcceptTpmReply,
    CloneVmReply,
    CreateSnapshotReply,
    CreateVmFromTemplateReply,
    DeleteDomainSnapshotReply,
    DeleteSnapshotReply,
    DeleteStateReply,
    DeleteTemplateReply,
    DeleteVmSnapshotReply,
    DisableTpmReply,
    EnableTpmReply,
    ImportStateReply,
    PlaceVmReply,
    PowerOffVmReply,
    PrepareVmReply,
    RestoreStateReply,
    ResumeVmReply,
    RetrieveStateReply,
    RevertDomainReply,
    RevertVmReply,
    SetPlacementEpochReply,
    ShutdownVmReply,
    SnapshotDomainReply,
    SnapshotVmReply,
    StartVmReply,
    StopVmReply,
    SuspendVmReply,
    UndefineVmReply,
)
from keeper_shared.messages.snapshot import (
    CreateSnapshot,
    DeleteSnapshot,
    ListSnapshots,
    SnapshotList,
)
from keeper_shared.messages.state import (
    FetchState,
    ListStateHistory,
    RestoreState,
    RetrieveState,
    StateFetched,
    StateHistory,
    StatePersisted,
    StateWriteRefused,
)
from keeper_shared.messages.template import (
    CreateTemplate,
    CreateVmFromTemplate,
    DeleteTemplate,
    ListTemplates,
    TemplateCreated,
    TemplatesListed,
)
from keeper_shared.messages.tpm import EnableTpm, TpmApproved, TpmRejected
from keeper_shared.messages.tpm_reset import AcceptTpm, TpmResetCleared
from keeper_shared.messages.transfer import CloneVm, ExportState, ImportState, StateExported
from keeper_shared.messages.vm import (
    PowerOffVm,
    PrepareVm,
    ShutdownVm,
    StartVm,
    UndefineVm,
    VmDefined,
    VmResumed,
    VmStarted,
    VmStopped,
    VmSuspended,
    VmUndefined,
)
from keeper_shared.messages.vm_control import (
    DeleteDomainSnapshot,
    ResumeVm,
    RevertDomain,
    SetPlacementEpoch,
    SnapshotDomain,
    SuspendVm,
)
from keeper_shared.messages.vm_snapshot import (
    DeleteVmSnapshot,
    RevertVm,
    SnapshotVm,
    VmSnapshotted,
)

ERROR_REPLY: type[Payload] = CommandRejected
"""The answer any command can get instead of its reply: its receiver could not take it
(undecodable, unknown type, invalid, expired or from a sender it does not serve)."""


class Receiver(enum.Enum):
    """The queues commands arrive on; each is one channel of the document."""

    HOST = "host-commands"
    """One host agent's own command queue (only the services' users may send there)."""
    STATE_STORE = "state-store-commands"
    """Any state-store replica."""
    POLICY = "policy-commands"
    """Any policy replica."""
    STATE_STORE_FOR_HOSTS = "state-store-host-requests"
    """What a host asks the store for itself (its QEMU hook), on the host-requests exchange."""
    POLICY_FOR_HOSTS = "policy-host-requests"
    """What a host asks policy for itself (its QEMU hook), on the host-requests exchange."""


@dataclass(frozen=True)
class CommandContract:
    """Where a command goes, what it is answered, and the events it leads to."""

    receivers: tuple[Receiver, ...]
    reply: type[Payload]
    """The reply when the receiver took the command (whatever its outcome)."""
    follow_up_events: tuple[type[Payload], ...] = ()
    """Facts published because the command was carried out (see the module's docstring)."""


_HOST = (Receiver.HOST,)
_STORE = (Receiver.STATE_STORE,)
_POLICY = (Receiver.POLICY,)

COMMANDS: Mapping[type[Payload], CommandContract] = {
    # Host agent: the services' orders to one hypervisor.
    FetchState: CommandContract(_HOST, StateFetched),
    PrepareVm: CommandContract(_HOST, PrepareVmReply),
    StartVm: CommandContract(_HOST, StartVmReply, (VmDefined, VmStarted)),
    ShutdownVm: CommandContract(_HOST, ShutdownVmReply, (VmStopped,)),
    PowerOffVm: CommandContract(_HOST, PowerOffVmReply, (VmStopped,)),
    UndefineVm: CommandContract(_HOST, UndefineVmReply, (VmUndefined,)),
    SetPlacementEpoch: CommandContract(_HOST, SetPlacementEpochReply),
    SuspendVm: CommandContract(_HOST, SuspendVmReply, (VmSuspended,)),
    ResumeVm: CommandContract(_HOST, ResumeVmReply, (VmResumed,)),
    SnapshotDomain: CommandContract(_HOST, SnapshotDomainReply),
    DeleteDomainSnapshot: CommandContract(_HOST, DeleteDomainSnapshotReply),
    RevertDomain: CommandContract(_HOST, RevertDomainReply, (VmDefined, VmStarted)),
    # State store.
    RetrieveState: CommandContract(
        (Receiver.STATE_STORE, Receiver.STATE_STORE_FOR_HOSTS),
        RetrieveStateReply,
        (StatePersisted, StateWriteRefused),
    ),
    RestoreState: CommandContract(_STORE, RestoreStateReply),
    ListStateHistory: CommandContract(_STORE, StateHistory),
    CreateSnapshot: CommandContract(_STORE, CreateSnapshotReply),
    DeleteSnapshot: CommandContract(_STORE, DeleteSnapshotReply),
    ListSnapshots: CommandContract(_STORE, SnapshotList),
    CloneVm: CommandContract(_STORE, CloneVmReply),
    ExportState: CommandContract(_STORE, StateExported),
    ImportState: CommandContract(_STORE, ImportStateReply),
    DeleteState: CommandContract(_STORE, DeleteStateReply, (StateDeleted,)),
    DescribeStoredState: CommandContract(_STORE, StoredStateDescribed),
    ReadEndorsementKey: CommandContract(_STORE, EndorsementKeyRead),
    AcceptTpm: CommandContract(_STORE, AcceptTpmReply, (TpmResetCleared,)),
    ReadNewestState: CommandContract((Receiver.STATE_STORE_FOR_HOSTS,), NewestState),
    # Policy.
    EnableTpm: CommandContract(_POLICY, EnableTpmReply, (TpmApproved, TpmRejected)),
    CreateTemplate: CommandContract(_POLICY, TemplateCreated),
    ListTemplates: CommandContract(_POLICY, TemplatesListed),
    DeleteTemplate: CommandContract(_POLICY, DeleteTemplateReply),
    CreateVmFromTemplate: CommandContract(
        _POLICY, CreateVmFromTemplateReply, (TpmApproved, TpmRejected)
    ),
    DisableTpm: CommandContract(_POLICY, DisableTpmReply, (StateDeleted, TpmDisabled)),
    PlaceVm: CommandContract(_POLICY, PlaceVmReply, (VmDefined, VmStarted, VmPlaced)),
    StopVm: CommandContract(
        _POLICY,
        StopVmReply,
        (StatePersisted, StateLossRecorded, VmStopped, VmUndefined, VmRetired),
    ),
    SnapshotVm: CommandContract(
        _POLICY,
        SnapshotVmReply,
        # Suspended, retrieved and resumed only for a snapshot with memory.
        (VmSuspended, StatePersisted, VmResumed, VmSnapshotted),
    ),
    RevertVm: CommandContract(
        _POLICY,
        RevertVmReply,
        # A running VM is powered off first, as by vm.stop; the revert is a placement.
        (StatePersisted, VmStopped, VmUndefined, VmDefined, VmStarted, VmPlaced),
    ),
    # A snapshot with memory is deleted on its host first; events: none.
    DeleteVmSnapshot: CommandContract(_POLICY, DeleteVmSnapshotReply),
    AdoptVm: CommandContract(_POLICY, VmAdoptionResult, (VmAdopted,)),
    ListVms: CommandContract(_POLICY, VmsListed),
    ListUnprotectedVms: CommandContract(_POLICY, UnprotectedVmsListed),
    ListHosts: CommandContract(_POLICY, HostsListed),
    ClaimPlacement: CommandContract((Receiver.POLICY_FOR_HOSTS,), PlacementClaimed, (VmPlaced,)),
}


def replies() -> frozenset[type[Payload]]:
    """Every message that answers a command, the error reply included."""
    return frozenset({contract.reply for contract in COMMANDS.values()} | {ERROR_REPLY})
