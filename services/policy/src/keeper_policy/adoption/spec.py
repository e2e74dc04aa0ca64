"""From a host's ``vm.discovered`` fact to the VM spec the approval rules judge, and whether
the host adopts it by itself. Pure: no I/O.

The guest OS comes from the request (``keeper vm adopt --guest-os``), else the keeper's
marker, else the libosinfo id virt-install and virt-manager record; a domain that names
none is judged as `unknown`, which the guest-OS rules refuse unless overridden.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from pydantic import ValidationError

from keeper_shared.messages.adoption import AdoptionMode, VmDiscovered
from keeper_shared.messages.tpm import VmSpec

UNKNOWN_GUEST_OS = "unknown"
"""The guest OS of a domain that names none."""

MAX_GUEST_OS = 64


@dataclass(frozen=True)
class AdoptionSpec:
    """The spec to approve, or why the domain cannot be judged at all."""

    spec: VmSpec | None
    problems: list[str]
    guest_os_known: bool


def guest_os_from_osinfo(osinfo_id: str) -> str | None:
    """`http://microsoft.com/win/11` -> `win11` (osinfo's short id, which policy's aliases
    know), `http://redhat.com/rhel/9.2` -> `rhel-9.2`; None when the id has no such form."""
    parsed = urlparse(osinfo_id)
    parts = [part for part in parsed.path.split("/") if part]
    if parsed.netloc == "microsoft.com" and len(parts) == 2 and parts[0] == "win":
        found = f"win{parts[1]}"
    elif len(parts) >= 2:
        found = f"{parts[-2]}-{parts[-1]}"
    else:
        return None
    return found.lower() if len(found) <= MAX_GUEST_OS else None


def guest_os_of(fact: VmDiscovered, requested: str | None) -> str | None:
    """The guest OS: asked for, else the marker's, else libosinfo's; None when unnamed."""
    if requested:
        return requested
    if fact.guest_os:
        return fact.guest_os
    if fact.spec.osinfo_id:
        return guest_os_from_osinfo(fact.spec.osinfo_id)
    return None


def adoption_spec(fact: VmDiscovered, requested_guest_os: str | None = None) -> AdoptionSpec:
    """The VM spec read from the domain. Only an emulated TPM is the keeper's to protect: a
    domain with a UEFI NVRAM and no such TPM is reported and left alone."""
    problems = []
    if not fact.spec.tpm_emulated:
        problems.append("tpm: the domain has no emulated TPM (swtpm) for vTPM Keeper to protect")
    guest_os = guest_os_of(fact, requested_guest_os)
    tpm_version = fact.spec.tpm_version or "2.0"  # libvirt's default for an emulated TPM
    if tpm_version not in ("1.2", "2.0"):
        problems.append(f"tpm-version: TPM {tpm_version} is not a version swtpm emulates")
    try:
        spec = VmSpec(
            vm_id=fact.vm_id,
            name=fact.name,
            arch=fact.spec.arch,
            machine=fact.spec.machine,
            firmware=fact.spec.firmware,
            memory_mib=max(16, fact.spec.memory_mib),
            guest_os=guest_os or UNKNOWN_GUEST_OS,
            tpm_version="1.2" if tpm_version == "1.2" else "2.0",
            secure_boot=fact.spec.secure_boot,
            smm=fact.spec.smm,
            # Its manager's secret, if any, stays its manager's: the keeper keeps none.
            encrypt_tpm_state=False,
        )
    except ValidationError as error:
        fields = ", ".join(sorted({str(item["loc"][0]) for item in error.errors()}))
        problems.append(f"domain: its {fields} cannot be used by vTPM Keeper")
        spec = None
    return AdoptionSpec(spec=spec, problems=problems, guest_os_known=guest_os is not None)


def explain_guest_os(reasons: list[str], guest_os_known: bool) -> list[str]:
    """The guest-OS reason of a domain that names no guest OS says how to name one."""
    if guest_os_known:
        return reasons
    return [
        "guest-os: the domain names no guest OS (libosinfo metadata, or the keeper marker's "
        "guest-os); name it with `keeper vm adopt --guest-os`"
        if reason.startswith("guest-os:")
        else reason
        for reason in reasons
    ]


def adopts_by_itself(fact: VmDiscovered) -> bool:
    """Whether the host's adoption mode adopts this domain without a request."""
    if fact.adoption is AdoptionMode.ALL:
        return True
    return fact.adoption is AdoptionMode.MARKED and fact.marked


def not_by_itself_reason(fact: VmDiscovered) -> str:
    """Why a domain that passes the rules was not adopted without a request."""
    what = "no domain" if fact.adoption is AdoptionMode.NONE else "only marked domains"
    return (
        f"adoption: host {fact.host} adopts {what} by itself (KEEPER_HOST_ADOPT="
        f"{fact.adoption.value}); `keeper vm adopt {fact.name}` adopts it"
    )
