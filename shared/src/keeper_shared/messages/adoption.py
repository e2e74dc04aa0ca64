"""Adoption: TPM and UEFI domains vTPM Keeper did not place, as hosts report them, and how
policy takes them under protection (on its own or on request) without touching the domain.
"""

from __future__ import annotations

import enum
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.tpm import Firmware
from keeper_shared.messages.types import HostId, SecretUuid, VmId, VmName
from keeper_shared.messages.vm import VmLifecycleFact


class AdoptionMode(enum.StrEnum):
    """Which unplaced domains of a host policy adopts by itself (the host's setting)."""

    ALL = "all"
    """Every domain that passes the approval rules."""
    MARKED = "marked"
    """Only domains whose metadata carries the keeper's adoption marker."""
    NONE = "none"
    """None: each is adopted only on request (``vm.adopt``)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class DomainSpecRead(_Frozen):
    """What a domain's XML says about it, as far as the TPM approval rules need it."""

    arch: str = Field(max_length=32, description="`<os><type arch>`; empty when absent.")
    machine: str = Field(max_length=64, description="`<os><type machine>`; empty when absent.")
    firmware: Firmware = Field(
        description="UEFI when the domain has a UEFI NVRAM, a pflash loader or "
        "`firmware='efi'`; BIOS otherwise."
    )
    memory_mib: int = Field(ge=0, description="`<memory>` in MiB (0 when unreadable).")
    tpm_model: str | None = Field(
        max_length=32, description="`<tpm model>`; None when the domain has no TPM."
    )
    tpm_version: str | None = Field(
        max_length=8,
        description="The emulator backend's `version`; None when the XML names none.",
    )
    tpm_emulated: bool = Field(description="The TPM is emulated by swtpm (backend `emulator`).")
    secure_boot: bool = Field(description="The loader is `secure='yes'`.")
    smm: bool = Field(description="`<features><smm state='on'>` (or `<smm/>`).")
    tpm_secret_uuid: SecretUuid | None = Field(
        description="The libvirt secret swtpm encrypts the TPM state with "
        "(`<encryption secret>`), as the domain's manager set it; None when unencrypted."
    )
    osinfo_id: str | None = Field(
        max_length=256,
        description="The libosinfo OS id in the domain's metadata (virt-install writes it, "
        "e.g. `http://microsoft.com/win/11`); None when absent.",
    )


class VmDiscovered(VmLifecycleFact):
    """A host holds a domain with an emulated TPM or a UEFI NVRAM that vTPM Keeper did not
    place (no placement epoch in its metadata). Sent at the agent's start-up, after each
    reconnect to libvirt, and when such a domain is defined or appears; policy registers and
    places it (adoption) when the host's mode or a request says so and the rules approve."""

    message_type = "vm.discovered"

    spec: DomainSpecRead = Field(description="The domain as its XML describes it.")
    running: bool = Field(description="The domain runs (or is paused) now.")
    marked: bool = Field(
        description="Its metadata carries the keeper's adoption marker (`<keeper:adopt/>`)."
    )
    guest_os: str | None = Field(
        max_length=64,
        description="The guest OS the marker names (`guest-os`); None when it names none.",
    )
    adoption: AdoptionMode = Field(description="The host's adoption mode.")


class AdoptVm(Payload):
    """Command to policy: adopt a domain a host reported (``vm.discovered``), whatever its
    host's adoption mode, still through the approval rules. Replied with
    :class:`VmAdoptionResult`."""

    message_type = "vm.adopt"

    vm: VmName = Field(description="The domain's UUID or its name.")
    host: HostId | None = Field(
        default=None, description="The host it is on, when several hosts report that name."
    )
    guest_os: str | None = Field(
        default=None,
        max_length=64,
        description="The guest OS for the approval rules, when neither the marker nor the "
        "libosinfo metadata names it.",
    )
    override: bool = Field(
        default=False, description="Adopt although the cluster's hosts do not all report swtpm."
    )
    override_guest_os: bool = Field(
        default=False, description="Adopt although the guest-OS rules do not allow a TPM."
    )


class VmAdoptionResult(Payload):
    """Reply to :class:`AdoptVm`."""

    message_type = "vm.adoption-result"

    adopted: bool = Field(description="The VM is protected now (adopted now or before).")
    vm_id: VmId | None = Field(description="The VM; None when no host reported the domain.")
    name: VmName | None = Field(default=None, description="Its domain name.")
    host: HostId | None = Field(default=None, description="The host it is placed on.")
    epoch: int | None = Field(default=None, ge=1, description="Its placement epoch.")
    reasons: list[str] = Field(
        default_factory=list, description="Why it was not adopted, each as `<rule>: <why>`."
    )
    overridden: list[str] = Field(
        default_factory=list, description="Rules an override skipped, each with its reason."
    )


class VmAdopted(Payload):
    """Policy adopted a domain: registered from its XML and placed on the host that holds
    it under a new epoch, neither redefined nor restarted."""

    message_type = "vm.adopted"

    vm_id: VmId = Field(description="The VM.")
    host: HostId = Field(description="The host it is placed on.")
    epoch: int = Field(ge=1, description="Its placement epoch.")
    requested_by: str | None = Field(
        max_length=256,
        description="Who asked (validated bus user, else the sender); None when the host's "
        "adoption mode adopted it.",
    )
    overridden: list[str] = Field(
        default_factory=list, description="Rules an override skipped, each with its reason."
    )


class ListUnprotectedVms(Payload):
    """Query to policy: the TPM and UEFI domains hosts reported that vTPM Keeper does not
    protect, with the reasons. Replied with :class:`UnprotectedVmsListed`."""

    message_type = "vms.unprotected.list"


class UnprotectedVmView(_Frozen):
    """A domain a host reported that is not adopted, and why."""

    vm_id: VmId = Field(description="The domain's UUID.")
    name: str = Field(max_length=256, description="Its libvirt domain name.")
    host: HostId = Field(description="The host that reported it.")
    running: bool = Field(description="It ran when the host last reported it.")
    reasons: list[str] = Field(description="Why it is not adopted, each as `<rule>: <why>`.")
    reported_at: datetime = Field(description="When the host last reported it (UTC).")


class UnprotectedVmsListed(Payload):
    """Reply to :class:`ListUnprotectedVms`."""

    message_type = "vms.unprotected.listed"

    vms: list[UnprotectedVmView] = Field(description="By host, then name.")
