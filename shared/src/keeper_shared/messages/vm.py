"""VM lifecycle: facts a host agent reports, and the commands a host agent carries out."""

from __future__ import annotations

import enum

from pydantic import Field

from keeper_shared.domain_document import MAX_START_XML_CHARS
from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.host_fact import HostFact
from keeper_shared.messages.sealed import SealedStateBlob, SealedTpmSecret
from keeper_shared.messages.types import HostId, VmId, VmName


class StopReason(enum.StrEnum):
    """Why a domain stopped, as libvirt reports it."""

    SHUTDOWN = "shutdown"
    DESTROYED = "destroyed"
    CRASHED = "crashed"
    MIGRATED = "migrated"
    SAVED = "saved"
    FAILED = "failed"
    FROM_SNAPSHOT = "from_snapshot"
    UNKNOWN = "unknown"


class VmLifecycleFact(HostFact):
    """Common fields of every lifecycle fact."""

    vm_id: VmId = Field(description="The domain's UUID.")
    host: HostId = Field(description="The host it happened on.")
    name: str = Field(max_length=256, description="The libvirt domain name.")


class VmDefined(VmLifecycleFact):
    """A domain was defined on the host."""

    message_type = "vm.defined"


class VmStarted(VmLifecycleFact):
    """A domain started running."""

    message_type = "vm.started"


class VmSuspended(VmLifecycleFact):
    """A domain was paused."""

    message_type = "vm.suspended"


class VmResumed(VmLifecycleFact):
    """A paused domain runs again."""

    message_type = "vm.resumed"


class VmStopped(VmLifecycleFact):
    """A domain stopped running."""

    message_type = "vm.stopped"

    reason: StopReason = Field(description="Why, as libvirt said.")
    missed: bool = Field(
        default=False,
        description="The host did not see the stop: it found the domain off when it re-read "
        "libvirt (after its own restart or a lost libvirt connection); ``reason`` is then "
        "libvirt's shut-off reason, `unknown` when libvirt kept none.",
    )


class VmUndefined(VmLifecycleFact):
    """A domain was undefined (libvirt may have removed its TPM state)."""

    message_type = "vm.undefined"


class PrepareVm(Payload):
    """Command: write this state into place before the VM starts on this host.

    v3 seals the blobs and the secret to the host's key, bound to ``epoch``; v2 carried them
    in clear and is refused (no upcaster: clear state is not accepted off the bus)."""

    message_type = "vm.prepare"
    schema_version = 3

    vm_id: VmId = Field(description="The VM to prepare.")
    name: VmName = Field(description="Domain name; the NVRAM file is `<name>_VARS.fd`.")
    epoch: int = Field(ge=1, description="The placement epoch this start belongs to.")
    tpm: SealedStateBlob | None = Field(
        default=None, description="TPM state, or None for a new TPM."
    )
    nvram: SealedStateBlob | None = Field(default=None, description="NVRAM, or None for a new one.")
    tpm_secret: SealedTpmSecret | None = Field(
        default=None,
        description="The libvirt secret the TPM state is encrypted with: defined on the host "
        "(private, persistent) before the VM starts. None for an unencrypted TPM.",
    )


class StartVm(Payload):
    """Command: define the domain from this XML and start it."""

    message_type = "vm.start"

    vm_id: VmId = Field(description="The VM to start; must match the XML's UUID.")
    epoch: int = Field(ge=1, description="The placement epoch, recorded in domain metadata.")
    domain_xml: str = Field(max_length=MAX_START_XML_CHARS, description="The libvirt domain XML.")


class ShutdownVm(Payload):
    """Command: ask the guest to shut down; reply once the domain is off."""

    message_type = "vm.shutdown"

    vm_id: VmId = Field(description="The VM to shut down.")
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="How long to wait.")


class PowerOffVm(Payload):
    """Command: stop the domain at once (libvirt `destroy`), without the guest's help."""

    message_type = "vm.poweroff"

    vm_id: VmId = Field(description="The VM to power off.")


class UndefineVm(Payload):
    """Command: remove the domain from this host, and its local TPM and NVRAM if told."""

    message_type = "vm.undefine"

    vm_id: VmId = Field(description="The VM to remove.")
    wipe_state: bool = Field(description="Also delete the local TPM state and NVRAM file.")
