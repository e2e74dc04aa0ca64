"""Whether a VM may have a TPM, and which libvirt element it gets. Pure: no I/O.

Every failed rule is reported, not just the first, so an operator fixes them in one go; each
reason starts with the rule's name. Hard technical rules (architecture, the firmware and
machine that architecture's TPM needs, TPM version, Secure Boot's machine) cannot be
overridden; the policy rules (guest-OS allowlist, cluster capability) can, and what an
override skipped is returned to be recorded.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from keeper_policy.tpm.guest_os import GuestOsRule, guest_os_support
from keeper_policy.tpm.profile_choice import OLDEST_HOST, backend_profile_element, choose_profile
from keeper_shared.messages.host import HostCapabilities
from keeper_shared.messages.tpm import Firmware, OsTpmSupport, VmSpec

TPM_MODEL_BY_ARCH = {
    "x86_64": "tpm-crb",
    "i686": "tpm-crb",
    "aarch64": "tpm-tis",
    "ppc64": "tpm-spapr",
    "ppc64le": "tpm-spapr",
}
"""libvirt TPM model per guest architecture. x86 gets CRB (TPM 2.0 only, as oVirt's
`tpm-crb`); libvirt accepts `tpm-tis` only for x86 and aarch64, where QEMU makes it the
sysbus `tpm-tis-device` of the `virt` machine; `tpm-spapr` is the pSeries vTPM (libvirt's
default there). QEMU has no TPM device for s390x, and oVirt does not offer one there."""

X86 = ("x86_64", "i686")
PPC64 = ("ppc64", "ppc64le")

FIRMWARE_BY_ARCH = {
    "x86_64": Firmware.UEFI,
    "i686": Firmware.UEFI,
    "aarch64": Firmware.UEFI,
    "ppc64": Firmware.SLOF,
    "ppc64le": Firmware.SLOF,
}
"""The firmware a TPM works with: the TPM's event log and ACPI table come from OVMF (x86)
or AAVMF (aarch64); pseries has no UEFI, SLOF drives `tpm-spapr` (oVirt requires OVMF for
a TPM on x86 only)."""


class Rule(enum.StrEnum):
    """The rules, named at the start of every reason."""

    FIRMWARE = "firmware"
    ARCHITECTURE = "architecture"
    MACHINE = "machine"
    TPM_VERSION = "tpm-version"
    SECURE_BOOT = "secure-boot"
    GUEST_OS = "guest-os"
    CLUSTER = "cluster-capability"


@dataclass(frozen=True)
class Overrides:
    """Which overridable rules the requester chose to skip."""

    cluster: bool = False
    guest_os: bool = False


@dataclass(frozen=True)
class ClusterView:
    """The live hosts of the cluster a VM will run in, as their heartbeats show them."""

    name: str
    hosts: Mapping[str, HostCapabilities]


@dataclass(frozen=True)
class TpmDecision:
    """The outcome: approved with its element, or the reasons it was not."""

    reasons: list[str] = field(default_factory=list)
    overridden: list[str] = field(default_factory=list)
    tpm_xml: str | None = None
    guest_os_support: OsTpmSupport = OsTpmSupport.UNSUPPORTED

    @property
    def approved(self) -> bool:
        """True when no rule failed (overridden ones do not count)."""
        return not self.reasons


def tpm_element(model: str, profile: str | None = None) -> str:
    """The exact libvirt `<tpm>` element: emulated (swtpm), TPM 2.0, with the libtpms
    profile its first start makes it with when one is pinned (see profile_choice)."""
    backend = "<backend type='emulator' version='2.0'"
    pinned = backend_profile_element(profile)
    backend += f">{pinned}</backend>" if pinned else "/>"
    return f"<tpm model='{model}'>{backend}</tpm>"


def is_q35(machine: str) -> bool:
    """`q35` and its versioned names (`pc-q35-8.2`), not `pc` / `pc-i440fx-*`."""
    return machine == "q35" or machine.startswith(("q35-", "pc-q35"))


def _reason(rule: Rule, text: str) -> str:
    return f"{rule.value}: {text}"


def is_pseries(machine: str) -> bool:
    """`pseries` and its versioned names (`pseries-8.2`), not `powernv`."""
    return machine == "pseries" or machine.startswith("pseries-")


def is_arm_virt(machine: str) -> bool:
    """`virt` and its versioned names (`virt-8.2`)."""
    return machine == "virt" or machine.startswith("virt-")


def hard_rule_failures(spec: VmSpec) -> list[str]:
    """Rules no override skips: without them the TPM cannot work at all."""
    if spec.arch not in TPM_MODEL_BY_ARCH:
        # Firmware and machine do not matter where no TPM device exists at all.
        reasons = [_reason(Rule.ARCHITECTURE, f"architecture {spec.arch} has no TPM model")]
    else:
        reasons = _firmware_failures(spec) + _machine_failures(spec)
    if spec.tpm_version != "2.0":
        reasons.append(
            _reason(Rule.TPM_VERSION, f"only TPM 2.0 is emulated, TPM {spec.tpm_version} asked")
        )
    if spec.secure_boot and spec.arch in X86:
        if not is_q35(spec.machine):
            reasons.append(
                _reason(Rule.SECURE_BOOT, f"Secure Boot needs a q35 machine, not {spec.machine}")
            )
        if not spec.smm:
            reasons.append(_reason(Rule.SECURE_BOOT, "Secure Boot needs SMM turned on"))
    if spec.secure_boot and spec.arch in PPC64:
        reasons.append(_reason(Rule.SECURE_BOOT, "pseries has no UEFI Secure Boot"))
    return reasons


def _firmware_failures(spec: VmSpec) -> list[str]:
    needed = FIRMWARE_BY_ARCH[spec.arch]
    if spec.firmware is needed:
        return []
    if needed is Firmware.UEFI:
        text = f"TPM emulation needs UEFI firmware, the VM has {spec.firmware}"
    else:
        text = f"a pseries TPM (tpm-spapr) works with SLOF firmware, the VM has {spec.firmware}"
    return [_reason(Rule.FIRMWARE, text)]


def _machine_failures(spec: VmSpec) -> list[str]:
    if spec.arch in PPC64 and not is_pseries(spec.machine):
        return [_reason(Rule.MACHINE, f"tpm-spapr needs a pseries machine, not {spec.machine}")]
    if spec.arch == "aarch64" and not is_arm_virt(spec.machine):
        return [_reason(Rule.MACHINE, f"aarch64's TPM needs the virt machine, not {spec.machine}")]
    return []


def cluster_problems(cluster: ClusterView) -> list[str]:
    """Why the cluster cannot run TPM VMs: no live host, or live hosts without swtpm."""
    if not cluster.hosts:
        return [_reason(Rule.CLUSTER, f"no live host of cluster {cluster.name} has reported")]
    without = sorted(host for host, caps in cluster.hosts.items() if caps.swtpm_version is None)
    if without:
        return [
            _reason(
                Rule.CLUSTER, f"hosts of cluster {cluster.name} without swtpm: {', '.join(without)}"
            )
        ]
    return []


def encryption_problems(spec: VmSpec, cluster: ClusterView) -> list[str]:
    """Why the cluster cannot run ``spec``'s encrypted TPM state: live hosts whose libvirt
    keeps no secrets could not define the one swtpm needs."""
    if not spec.encrypt_tpm_state:
        return []
    without = sorted(host for host, caps in cluster.hosts.items() if not caps.tpm_secrets)
    if not without:
        return []
    return [
        _reason(
            Rule.CLUSTER,
            f"hosts of cluster {cluster.name} whose libvirt keeps no secrets (needed to "
            f"encrypt the TPM state): {', '.join(without)}",
        )
    ]


def decide_tpm(
    spec: VmSpec,
    *,
    rules: Sequence[GuestOsRule],
    aliases: Mapping[str, str],
    cluster: ClusterView,
    overrides: Overrides,
    profile_setting: str = OLDEST_HOST,
) -> TpmDecision:
    """Apply every rule to ``spec`` for ``cluster``; ``profile_setting``: the cluster's
    libtpms profile setting (see profile_choice)."""
    reasons = hard_rule_failures(spec)
    overridden: list[str] = []

    verdict = guest_os_support(spec.guest_os, rules, aliases)
    if verdict.support is OsTpmSupport.UNSUPPORTED:
        problem = _reason(Rule.GUEST_OS, f"not allowed a TPM: {verdict.explanation}")
        (overridden if overrides.guest_os else reasons).append(problem)

    profile = choose_profile(cluster.name, cluster.hosts, profile_setting)
    capability = cluster_problems(cluster) + encryption_problems(spec, cluster)
    if profile.problem is not None:
        capability.append(_reason(Rule.CLUSTER, profile.problem))
    (overridden if overrides.cluster else reasons).extend(capability)

    if reasons:
        return TpmDecision(reasons=reasons, overridden=overridden, guest_os_support=verdict.support)
    return TpmDecision(
        overridden=overridden,
        tpm_xml=tpm_element(TPM_MODEL_BY_ARCH[spec.arch], profile.profile),
        guest_os_support=verdict.support,
    )
