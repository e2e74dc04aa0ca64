"""Enabling a TPM: the request and the policy's decision."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.types import VmId, VmName


class Firmware(enum.StrEnum):
    """Boot firmware of the VM."""

    UEFI = "uefi"
    BIOS = "bios"


class VmSpec(BaseModel):
    """What the operator wants: enough to decide on a TPM and to build the domain."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    vm_id: VmId = Field(description="The VM's UUID.")
    name: VmName = Field(description="The libvirt domain name.")
    arch: str = Field(default="x86_64", max_length=32, description="Guest architecture.")
    machine: str = Field(default="q35", max_length=32, description="Machine type.")
    firmware: Firmware = Field(default=Firmware.UEFI, description="Boot firmware.")
    memory_mib: int = Field(default=256, ge=16, le=4 * 1024 * 1024, description="Guest RAM.")
    guest_os: str = Field(max_length=64, description="Guest OS id, e.g. `windows-11`, `rhel-9`.")


class EnableTpm(Payload):
    """Command to policy: approve (or reject) a TPM for this VM and register it."""

    message_type = "tpm.enable"

    spec: VmSpec = Field(description="The VM.")
    override: bool = Field(default=False, description="Approve despite cluster capability.")


class TpmApproved(Payload):
    """Policy approved a TPM; carries the exact libvirt element to use."""

    message_type = "tpm.approved"

    vm_id: VmId = Field(description="The VM.")
    tpm_xml: str = Field(description="The `<tpm>` element for the domain XML.")
    overridden: list[str] = Field(default_factory=list, description="Rules an override skipped.")


class TpmRejected(Payload):
    """Policy rejected a TPM; every reason is listed."""

    message_type = "tpm.rejected"

    vm_id: VmId = Field(description="The VM.")
    reasons: list[str] = Field(min_length=1, description="Every rule that failed.")
