"""Enabling a TPM: the request and the policy's decision."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keeper_shared.messages.envelope import Payload, register_upcaster
from keeper_shared.messages.host_fact import HostFact
from keeper_shared.messages.types import HOST_ID_PATTERN, HostId, SecretUuid, VmId, VmName
from keeper_shared.messages.vm_hardware import MAX_DISKS, MAX_INTERFACES, DiskSpec, InterfaceSpec

CLUSTER_PATTERN = HOST_ID_PATTERN
"""Cluster names follow the host id rules: plain words that are safe in keys and logs."""

DEFAULT_CLUSTER = "default"
"""The cluster of every host that does not name one."""


class Firmware(enum.StrEnum):
    """Boot firmware of the VM."""

    UEFI = "uefi"
    """OVMF on x86, AAVMF on aarch64: what a TPM needs there."""
    BIOS = "bios"
    """SeaBIOS (x86): no TPM is approved with it."""
    SLOF = "slof"
    """SLOF, the Open Firmware of POWER pseries machines (they have no UEFI)."""


class OsTpmSupport(enum.StrEnum):
    """osinfo-style TPM support of a guest OS (oVirt's ``tpmSupport``)."""

    UNSUPPORTED = "unsupported"
    """The OS may not have a TPM (the default for every OS no rule names)."""
    SUPPORTED = "supported"
    """The OS may have a TPM."""
    REQUIRED = "required"
    """The OS will not install or run without one (Windows 11, Server 2022)."""


class VmSpec(BaseModel):
    """What the operator wants: enough to decide on a TPM and to build the domain."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    vm_id: VmId = Field(description="The VM's UUID.")
    name: VmName = Field(description="The libvirt domain name.")
    arch: str = Field(default="x86_64", max_length=32, description="Guest architecture.")
    machine: str = Field(default="q35", max_length=32, description="Machine type.")
    firmware: Firmware = Field(
        default=Firmware.UEFI,
        description="Boot firmware: `uefi` on x86_64 and aarch64, `slof` on ppc64 pseries.",
    )
    memory_mib: int = Field(default=256, ge=16, le=4 * 1024 * 1024, description="Guest RAM.")
    guest_os: str = Field(
        max_length=64,
        description="Guest OS id `<family>-<version>` (e.g. `windows-11`, `rhel-9.2`, "
        "`windows-server-2022`) or an osinfo short id policy knows (`win11`, `win2k22`).",
    )
    tpm_version: Literal["1.2", "2.0"] = Field(
        default="2.0", description="TPM version asked for; only 2.0 is approved."
    )
    secure_boot: bool = Field(
        default=False,
        description="Boot with UEFI Secure Boot (needs a q35 machine with SMM on x86).",
    )
    smm: bool = Field(
        default=True, description="System Management Mode on; Secure Boot on x86 needs it."
    )
    encrypt_tpm_state: bool = Field(
        default=False,
        description="Have swtpm encrypt the TPM state with a per-VM libvirt secret (usage "
        "`vtpm`) the keeper creates once, keeps encrypted in the store and defines on each "
        "host before the VM starts there.",
    )
    vcpus: int = Field(
        default=1, ge=1, le=512, description="Virtual CPUs of the domain policy's template."
    )
    disks: list[DiskSpec] = Field(
        default_factory=list,
        max_length=MAX_DISKS,
        description="File-backed disks of the domain policy's template, in boot order.",
    )
    interfaces: list[InterfaceSpec] = Field(
        default_factory=list,
        max_length=MAX_INTERFACES,
        description="Network interfaces of the domain policy's template.",
    )

    @model_validator(mode="after")
    def _distinct_devices(self) -> VmSpec:
        # libvirt refuses both only when the domain is defined, on the host, mid-start.
        sources = [disk.source for disk in self.disks]
        if len(set(sources)) != len(sources):
            raise ValueError("two disks share an image file")
        macs = [nic.mac for nic in self.interfaces if nic.mac is not None]
        if len(set(macs)) != len(macs):
            raise ValueError("two interfaces share a MAC address")
        return self


class EnableTpm(Payload):
    """Command to policy: approve (or reject) a TPM for this VM and register it."""

    message_type = "tpm.enable"
    schema_version = 3

    spec: VmSpec = Field(description="The VM.")
    cluster: str = Field(
        default=DEFAULT_CLUSTER,
        pattern=CLUSTER_PATTERN,
        description="The cluster the VM will run in; all its live hosts must have swtpm.",
    )
    override: bool = Field(
        default=False,
        description="Approve although the cluster's hosts do not all report swtpm.",
    )
    override_guest_os: bool = Field(
        default=False, description="Approve although the guest-OS rules do not allow a TPM."
    )
    allow_duplicate_name: bool = Field(
        default=False,
        description="Register the VM although another registered VM has the same domain "
        "name (refused otherwise: a name should name one VM).",
    )


@register_upcaster(EnableTpm.message_type, 1)
def _enable_tpm_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 specs predate ``encrypt_tpm_state``; its default (not encrypted) applies."""
    return data


@register_upcaster(EnableTpm.message_type, 2)
def _enable_tpm_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v2 predates ``allow_duplicate_name`` (its default applies: a name another VM has is
    refused) and the spec's ``vcpus``, ``disks`` and ``interfaces`` (their defaults, one
    vCPU, no disk, no interface, are the template as it was)."""
    return data


class TpmApproved(Payload):
    """Policy approved a TPM; carries the exact libvirt element to use."""

    message_type = "tpm.approved"

    vm_id: VmId = Field(description="The VM.")
    tpm_xml: str = Field(description="The `<tpm>` element for the domain XML.")
    overridden: list[str] = Field(
        default_factory=list, description="Rules an override skipped, each with its reason."
    )
    override_requested_by: str | None = Field(
        default=None,
        max_length=256,
        description="Who asked for the override (validated bus user, else the sender); "
        "None when nothing was overridden.",
    )
    guest_os_support: OsTpmSupport = Field(
        default=OsTpmSupport.SUPPORTED, description="What the guest-OS rules say of this OS."
    )
    cluster: str = Field(default=DEFAULT_CLUSTER, description="The cluster it was checked for.")


class TpmRejected(Payload):
    """Policy rejected a TPM; every reason is listed."""

    message_type = "tpm.rejected"

    vm_id: VmId = Field(description="The VM.")
    reasons: list[str] = Field(
        min_length=1, description="Every rule that failed, as `<rule>: <why>`."
    )


class TpmStateStranded(HostFact):
    """A VM's TPM state is stranded on its host: swtpm encrypts it with a libvirt secret
    the keeper did not create and the host cannot read (a private secret). The state is
    still saved, but it is useless on any other host, so the VM cannot be moved or restored
    elsewhere until the secret is made readable or defined there by hand."""

    message_type = "tpm.state.stranded"

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="The host that found it.")
    secret_uuid: SecretUuid = Field(description="The secret the domain's TPM names.")
    reason: str = Field(max_length=512, description="Why the host cannot read it.")
