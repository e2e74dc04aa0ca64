"""Whether a VM may be placed on a host. Pure: no I/O.

A VM goes only to a live host with swtpm that runs its architecture (and has UEFI firmware
when the VM boots UEFI), as the host's heartbeat reports them, and not to one whose swtpm is
older than the one that last ran it: swtpm's state format only moves forward, so an older
swtpm may fail to read (or silently misread) newer state. An explicit override lets that one
through and is recorded. A VM whose TPM state is encrypted goes only to a host whose libvirt
keeps secrets. A VM whose TPM state needs a libtpms StateFormatLevel goes only to a host
whose libtpms loads that level (see `keeper_shared.libtpms`). Each check returns every
problem it finds, so a refusal lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from keeper_policy.hosts.registry import HostRecord
from keeper_policy.versions import VersionError, parse_version
from keeper_shared.libtpms import NULL_PROFILE_LEVEL, LibtpmsVersionError, StateProfile, release_of
from keeper_shared.messages.tpm import Firmware, VmSpec


@dataclass(frozen=True)
class PlacementCheck:
    """The verdict: refused with a reason, or allowed (maybe only thanks to an override)."""

    refusal: str | None = None
    overridden: str | None = None


def target_problems(
    target: HostRecord | None, host_id: str, *, now: float, lost_after_s: float
) -> list[str]:
    """Why ``host_id`` cannot take a VM now (empty when it can): never heard of, lost or
    silent, without swtpm."""
    if target is None:
        return [f"host {host_id} has never sent a heartbeat"]
    problems = []
    if target.lost_at is not None:
        problems.append(
            f"host {host_id} is declared lost (silent for {now - target.last_seen:.0f} s)"
        )
    elif now - target.last_seen > lost_after_s:
        problems.append(f"host {host_id} has sent no heartbeat for {now - target.last_seen:.0f} s")
    if target.capabilities.swtpm_version is None:
        problems.append(f"host {host_id} has no swtpm")
    return problems


def machine_problems(target: HostRecord, host_id: str, spec: VmSpec) -> list[str]:
    """Why ``host_id`` cannot run ``spec`` as its heartbeat describes it: the VM's
    architecture is not one the host runs, or the VM boots UEFI and the host has no UEFI
    firmware (OVMF, AAVMF) to give it. SLOF comes with QEMU itself, so a pseries VM needs
    nothing more."""
    capabilities = target.capabilities
    problems = []
    if spec.arch not in capabilities.architectures:
        runs = ", ".join(capabilities.architectures) or "no architecture it reported"
        problems.append(f"host {host_id} runs {runs}, not the VM's {spec.arch}")
    if spec.firmware is Firmware.UEFI and not capabilities.uefi_firmware:
        problems.append(f"host {host_id} has no UEFI firmware (OVMF/AAVMF) for the VM's UEFI boot")
    return problems


def check_tpm_secrets(target: HostRecord, host_id: str, *, encrypt_tpm_state: bool) -> str | None:
    """Why ``host_id`` cannot run a VM whose TPM state is encrypted, or None: swtpm needs
    the VM's libvirt secret there, and a libvirt without a secret driver cannot keep it."""
    if encrypt_tpm_state and not target.capabilities.tpm_secrets:
        return (
            f"host {host_id}'s libvirt keeps no secrets: it cannot run a VM whose TPM state "
            "is encrypted"
        )
    return None


def check_state_format(
    target: HostRecord | None, host_id: str, profile: StateProfile | None
) -> str | None:
    """Why ``host_id``'s libtpms cannot load the VM's TPM state, or None. Level 1 (the
    ``null`` profile, all state libtpms 0.9 and older made) every libtpms loads; an unknown
    profile (never persisted, or unreadable) leaves nothing to check. A host that does not
    report its libtpms (an older agent) is taken to load level 1 only."""
    if target is None or profile is None or profile.state_format_level <= NULL_PROFILE_LEVEL:
        return None
    needs = (
        f"the VM's TPM state (libtpms profile {profile.name}) needs StateFormatLevel "
        f"{profile.state_format_level}"
    )
    version = target.capabilities.libtpms_version
    if version is None:
        return f"host {host_id} does not report its libtpms version, and {needs}"
    try:
        highest = release_of(version).highest_level
    except LibtpmsVersionError:
        return f"host {host_id} reports libtpms {version!r}, not a version, and {needs}"
    if highest >= profile.state_format_level:
        return None
    return (
        f"host {host_id} runs libtpms {version}, which loads up to StateFormatLevel "
        f"{highest}, but {needs}"
    )


def check_swtpm_version(
    *,
    host_id: str,
    host_swtpm: str,
    last_swtpm: str | None,
    last_host: str | None,
    override: bool,
) -> PlacementCheck:
    """Refuse a host whose swtpm is older than the one that last ran the VM."""
    if last_swtpm is None:
        return PlacementCheck()  # never ran: any swtpm manufactures its TPM
    try:
        older = parse_version(host_swtpm) < parse_version(last_swtpm)
        problem = (
            f"host {host_id} runs swtpm {host_swtpm}, older than swtpm {last_swtpm} that last "
            f"wrote this VM's state (on {last_host or 'an unknown host'})"
        )
    except VersionError:
        older = True
        problem = (
            f"cannot compare host {host_id}'s swtpm {host_swtpm!r} with swtpm {last_swtpm!r} "
            "that last wrote this VM's state"
        )
    if not older:
        return PlacementCheck()
    if override:
        return PlacementCheck(overridden=problem)
    return PlacementCheck(refusal=f"{problem}; place with override_version to allow it")


def check_current_placement(
    current_host: str | None, current: HostRecord | None, target_host: str
) -> str | None:
    """Why the VM cannot move from where it is placed now, or None. A VM on a lost host may
    be placed elsewhere: the new epoch fences the lost host."""
    if current_host is None or current_host == target_host:
        return None
    if current is not None and current.lost_at is not None:
        return None
    return f"VM is placed on {current_host}; stop it there first"
