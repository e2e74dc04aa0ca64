"""Request bodies of the API's routes (their replies are the bus's own reply models)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from keeper_shared.messages.snapshot import SNAPSHOT_ID_PATTERN
from keeper_shared.messages.tpm import Firmware
from keeper_shared.messages.transfer import CloneTpm
from keeper_shared.messages.types import HostId, StateKind, VmId, VmName


class Body(BaseModel):
    """Unknown fields are refused: a misspelt option must not be silently dropped."""

    model_config = ConfigDict(extra="forbid")


class EnableTpmBody(Body):
    name: VmName = Field(description="libvirt domain name.")
    guest_os: str = Field(min_length=1, max_length=64, description="e.g. windows-11, rhel-9.2")
    vm_id: VmId | None = Field(default=None, description="The VM's UUID (a new one if absent).")
    arch: str = "x86_64"
    machine: str = "q35"
    firmware: Firmware = Firmware.UEFI
    memory_mib: int = Field(default=256, ge=16, le=4 * 1024 * 1024)
    secure_boot: bool = False
    encrypt_state: bool = False
    override: bool = False
    override_guest_os: bool = False
    allow_duplicate_name: bool = False


class StartBody(Body):
    host: HostId
    domain_xml: str | None = Field(default=None, max_length=1024 * 1024)


class RestoreBody(Body):
    """Exactly one of ``version`` (with ``kinds``) or ``snapshot``."""

    host: HostId
    version: int | None = Field(default=None, ge=1)
    kinds: list[StateKind] | None = None
    snapshot: str | None = Field(default=None, pattern=SNAPSHOT_ID_PATTERN)


class SnapshotBody(Body):
    snapshot_id: str = Field(pattern=SNAPSHOT_ID_PATTERN)
    memory: bool = False


class RevertBody(Body):
    snapshot_id: str = Field(pattern=SNAPSHOT_ID_PATTERN)


class CloneBody(Body):
    target_vm_id: VmId
    tpm: CloneTpm


class ReasonBody(Body):
    reason: str = Field(default="", max_length=500)


class AdoptBody(Body):
    host: HostId | None = None
    guest_os: str | None = Field(default=None, max_length=64)
    override: bool = False
    override_guest_os: bool = False


class ExportBody(Body):
    passphrase: str = Field(min_length=8, max_length=1024)


class ImportBody(Body):
    bundle_base64: str = Field(description="The bundle file's bytes, base64.")
    passphrase: str = Field(min_length=8, max_length=1024)
    target_vm_id: VmId | None = None


class CreateTemplateBody(Body):
    name: VmName
    from_vm: VmName = Field(description="The VM (id or name) whose NVRAM it starts from.")


class CreateVmFromTemplateBody(Body):
    name: VmName
    vm_id: VmId | None = None
    override: bool = False
    override_guest_os: bool = False
    allow_duplicate_name: bool = False
