"""The reply of each command that is carried out or refused: ``ok``, ``error`` and
``timed_out`` (from :class:`CommandOutcome`) and the facts of what was done, each a typed
field. A reply's type is its command's type with ``.reply``; a refused or failed command's
reply leaves its facts at their defaults.

They are one family, kept apart from the commands' modules, because callers read them
together: a workflow that relays one command answers with another's reply.
"""

from __future__ import annotations

from pydantic import Field

from keeper_shared.messages.commands import CommandOutcome
from keeper_shared.messages.placement import StopTrigger
from keeper_shared.messages.snapshot import SnapshotId
from keeper_shared.messages.tpm import OsTpmSupport
from keeper_shared.messages.types import ContentHash, HostId, SecretUuid, StateKind, VmId
from keeper_shared.messages.vm_snapshot import SnapshotMode

_VERSIONS = "The version of each kind (tpm, nvram) concerned; a kind not stored is absent."
_ENCRYPTION_UUID_DOC = (
    "The libvirt secret the VM's TPM state is encrypted with (the domain's "
    "`<encryption secret>` must name it), when it is encrypted."
)

# Host agent.


class PrepareVmReply(CommandOutcome):
    """Reply to ``vm.prepare``: what the host wrote into place."""

    message_type = "vm.prepare.reply"

    tpm_hash: ContentHash | None = Field(
        default=None, description="Content hash of the TPM state written, if one was given."
    )
    nvram_hash: ContentHash | None = Field(
        default=None, description="Content hash of the NVRAM written, if one was given."
    )
    tpm_secret_uuid: SecretUuid | None = Field(default=None, description=_ENCRYPTION_UUID_DOC)


class StartVmReply(CommandOutcome):
    """Reply to ``vm.start``: the domain is defined and running."""

    message_type = "vm.start.reply"


class ShutdownVmReply(CommandOutcome):
    """Reply to ``vm.shutdown``: the guest shut down and the domain is off."""

    message_type = "vm.shutdown.reply"


class PowerOffVmReply(CommandOutcome):
    """Reply to ``vm.poweroff``: the domain is off (it may have been off already)."""

    message_type = "vm.poweroff.reply"


class UndefineVmReply(CommandOutcome):
    """Reply to ``vm.undefine``."""

    message_type = "vm.undefine.reply"

    was_defined: bool = Field(
        default=False,
        description="True when the domain was defined on the host and is now removed; "
        "false when it was not defined there (nothing to do, which is a success).",
    )


class SetPlacementEpochReply(CommandOutcome):
    """Reply to ``vm.set-epoch``."""

    message_type = "vm.set-epoch.reply"

    epoch: int | None = Field(default=None, description="The domain's placement epoch now.")
    previous_epoch: int | None = Field(
        default=None, description="The epoch it had before (equal to epoch: nothing changed)."
    )


class DomainChangeReply(CommandOutcome):
    """Base of the replies of a change to a running domain that may have been made already."""

    changed: bool = Field(default=False, description="False when it was so already.")


class SuspendVmReply(DomainChangeReply):
    """Reply to ``vm.suspend``: the domain is paused (``changed`` false: it was already)."""

    message_type = "vm.suspend.reply"


class ResumeVmReply(DomainChangeReply):
    """Reply to ``vm.resume``: the domain runs (``changed`` false: it ran already)."""

    message_type = "vm.resume.reply"


class SnapshotDomainReply(DomainChangeReply):
    """Reply to ``vm.snapshot-domain``: the libvirt snapshot exists (``changed`` false: it
    existed already)."""

    message_type = "vm.snapshot-domain.reply"

    snapshot_xml: str | None = Field(
        default=None,
        max_length=1_048_576,
        description="The snapshot's libvirt XML (secure), which policy keeps so the snapshot "
        "can be redefined after the domain was undefined.",
    )


class RevertDomainReply(CommandOutcome):
    """Reply to ``vm.revert-domain``: the domain runs again from the snapshot's memory."""

    message_type = "vm.revert-domain.reply"


class DeleteDomainSnapshotReply(DomainChangeReply):
    """Reply to ``vm.snapshot-domain-delete``: the snapshot and its memory file are gone
    (``changed`` false: there was neither)."""

    message_type = "vm.snapshot-domain-delete.reply"


# State store.


class RetrieveStateReply(CommandOutcome):
    """Reply to ``state.retrieve``: the VM's state on its host is what the store holds."""

    message_type = "state.retrieve.reply"

    versions: dict[StateKind, int] = Field(
        default_factory=dict, description=f"The newest stored versions. {_VERSIONS}"
    )


class RestoreStateReply(CommandOutcome):
    """Reply to ``state.restore``: the host wrote the stored state into place."""

    message_type = "state.restore.reply"

    versions: dict[StateKind, int] = Field(
        default_factory=dict, description=f"The versions sent. {_VERSIONS}"
    )
    tpm_secret_uuid: SecretUuid | None = Field(default=None, description=_ENCRYPTION_UUID_DOC)


class CreateSnapshotReply(CommandOutcome):
    """Reply to ``snapshot.create``."""

    message_type = "snapshot.create.reply"

    versions: dict[StateKind, int] = Field(
        default_factory=dict, description=f"The pinned versions. {_VERSIONS}"
    )
    already_existed: bool = Field(
        default=False,
        description="True when the snapshot existed already with these versions (a repeat).",
    )


class DeleteSnapshotReply(CommandOutcome):
    """Reply to ``snapshot.delete``."""

    message_type = "snapshot.delete.reply"

    deleted: bool = Field(default=False, description="False when there was no such snapshot.")


class DeleteVmSnapshotReply(CommandOutcome):
    """Reply to ``vm.snapshot-delete``."""

    message_type = "vm.snapshot-delete.reply"

    deleted: bool = Field(default=False, description="False when there was no such snapshot.")
    memory_deleted_on: HostId | None = Field(
        default=None,
        description="The host whose copy of the snapshot's memory was deleted; None for a "
        "snapshot without memory.",
    )
    memory_left_on: HostId | None = Field(
        default=None,
        description="A host declared lost that still holds the snapshot's memory file: "
        "remove it there before the host rejoins (`<snapshot_dir>/<vm>/<snapshot>.mem`).",
    )


class FirstStateReply(CommandOutcome):
    """Base of the replies of a clone and an import: what was stored as a VM's first state."""

    vm_id: VmId | None = Field(default=None, description="The VM that now has the state.")
    versions: dict[StateKind, int] = Field(
        default_factory=dict, description=f"The versions stored (1 each). {_VERSIONS}"
    )
    already_stored: bool = Field(
        default=False, description="True when this very state was stored already (a repeat)."
    )


class CloneVmReply(FirstStateReply):
    """Reply to ``vm.clone``."""

    message_type = "vm.clone.reply"


class ImportStateReply(FirstStateReply):
    """Reply to ``state.import``."""

    message_type = "state.import.reply"


class _StateDeletedCounts(CommandOutcome):
    """How much stored state a deletion removed."""

    deleted_versions: dict[StateKind, int] = Field(
        default_factory=dict, description="How many versions of each kind were deleted."
    )
    deleted_snapshots: int = Field(default=0, ge=0, description="How many snapshots went.")


class DeleteStateReply(_StateDeletedCounts):
    """Reply to ``state.delete``."""

    message_type = "state.delete.reply"


class AcceptTpmReply(CommandOutcome):
    """Reply to ``state.tpm.accept``."""

    message_type = "state.tpm.accept.reply"

    version: int | None = Field(default=None, description="The TPM version now the VM's own.")
    reset_version: int | None = Field(
        default=None, description="The reset this ended (its first version), when one was."
    )


# Policy.


class _TpmApproval(CommandOutcome):
    """What approving a VM's TPM decided."""

    tpm_xml: str | None = Field(default=None, description="The approved `<tpm>` element.")
    guest_os_support: OsTpmSupport | None = Field(
        default=None, description="What the guest OS rules say of its TPM support."
    )
    overridden: list[str] = Field(
        default_factory=list, description="The checks that failed and were overridden."
    )


class EnableTpmReply(_TpmApproval):
    """Reply to ``tpm.enable``."""

    message_type = "tpm.enable.reply"


class CreateVmFromTemplateReply(_TpmApproval):
    """Reply to ``vm.create-from-template``."""

    message_type = "vm.create-from-template.reply"

    template_id: VmId | None = Field(default=None, description="The template used.")
    nvram_copied: bool = Field(
        default=False, description="True when the template's NVRAM was copied to the VM."
    )


class DeleteTemplateReply(CommandOutcome):
    """Reply to ``template.delete``."""

    message_type = "template.delete.reply"

    template_id: VmId | None = Field(default=None, description="The deleted template.")
    name: str | None = Field(default=None, description="Its name.")
    nvram_versions: int = Field(
        default=0, ge=0, description="How many stored versions of its NVRAM were deleted."
    )


class DisableTpmReply(_StateDeletedCounts):
    """Reply to ``tpm.disable``: the VM's stored state and registration are gone."""

    message_type = "tpm.disable.reply"


class PlaceVmReply(CommandOutcome):
    """Reply to ``vm.place``: the VM runs on the host."""

    message_type = "vm.place.reply"

    epoch: int | None = Field(default=None, description="Its placement epoch there.")
    already_placed: bool = Field(
        default=False,
        description="True when it ran there already (a repeat): nothing was restored.",
    )
    versions: dict[StateKind, int] = Field(
        default_factory=dict, description=f"The stored versions it started with. {_VERSIONS}"
    )
    tpm_secret_uuid: SecretUuid | None = Field(default=None, description=_ENCRYPTION_UUID_DOC)
    version_overridden: str | None = Field(
        default=None,
        description="The swtpm version check that was overridden (an older swtpm allowed).",
    )


class StopVmReply(CommandOutcome):
    """Reply to ``vm.stop``: how the stop went."""

    message_type = "vm.stop.reply"

    was_running: bool = Field(
        default=False,
        description="False when the VM ran nowhere: nothing was done (a success).",
    )
    host: HostId | None = Field(default=None, description="The host it ran on.")
    trigger: StopTrigger | None = Field(default=None, description="What stopped it.")
    retrieved: bool = Field(
        default=False, description="True when its final state was retrieved and stored."
    )
    attempts: int = Field(default=0, ge=0, description="Retrieval attempts made.")
    removed: bool = Field(
        default=False, description="True when the domain was undefined and its state wiped."
    )
    kept: bool = Field(
        default=False,
        description="True when the domain was left defined: it belongs to its VM manager "
        "(an adopted VM).",
    )


class SnapshotVmReply(CommandOutcome):
    """Reply to ``vm.snapshot``."""

    message_type = "vm.snapshot.reply"

    mode: SnapshotMode | None = Field(default=None, description="What kind of snapshot it is.")
    versions: dict[StateKind, int] = Field(
        default_factory=dict, description=f"The pinned versions. {_VERSIONS}"
    )
    persisted_age_s: float | None = Field(
        default=None,
        description="For a live snapshot: how old the pinned state was (how far it may "
        "trail the running TPM).",
    )


class RevertVmReply(CommandOutcome):
    """Reply to ``vm.revert``."""

    message_type = "vm.revert.reply"

    snapshot_id: SnapshotId | None = Field(
        default=None, description="The snapshot the VM went back to."
    )
    host: HostId | None = Field(
        default=None, description="Where the snapshot's memory is, and the VM runs again."
    )
    epoch: int | None = Field(default=None, description="The VM's new placement epoch.")
    versions: dict[StateKind, int] = Field(
        default_factory=dict, description=f"The pinned versions put back. {_VERSIONS}"
    )
