"""Whether a VM may have a TPM, and which libvirt element it gets. Pure: no I/O.

Every failed rule is reported, not just the first, so an operator fixes them in one go.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from keeper_shared.messages.host import HostCapabilities
from keeper_shared.messages.tpm import Firmware, VmSpec

TPM_MODEL_BY_ARCH = {
    "x86_64": "tpm-crb",
    "i686": "tpm-crb",
    "aarch64": "tpm-tis",
    "ppc64": "tpm-spapr",
    "ppc64le": "tpm-spapr",
}
"""libvirt TPM model per guest architecture; s390x has none."""


@dataclass(frozen=True)
class TpmDecision:
    """The outcome: approved with its element, or the reasons it was not."""

    reasons: list[str] = field(default_factory=list)
    overridden: list[str] = field(default_factory=list)
    tpm_xml: str | None = None

    @property
    def approved(self) -> bool:
        """True when no rule failed (overridden ones do not count)."""
        return not self.reasons


def tpm_element(model: str) -> str:
    """The exact libvirt `<tpm>` element: emulated (swtpm), TPM 2.0."""
    return f"<tpm model='{model}'><backend type='emulator' version='2.0'/></tpm>"


def decide_tpm(
    spec: VmSpec,
    *,
    guest_os_rules: Mapping[str, str],
    cluster: Mapping[str, HostCapabilities],
    override: bool,
) -> TpmDecision:
    """Apply the rules to ``spec`` against the hosts of the cluster."""
    reasons: list[str] = []
    overridden: list[str] = []
    if spec.firmware is not Firmware.UEFI:
        reasons.append(f"TPM emulation needs UEFI firmware, the VM has {spec.firmware.value}")
    model = TPM_MODEL_BY_ARCH.get(spec.arch)
    if model is None:
        reasons.append(f"architecture {spec.arch} has no TPM model")
    if spec.arch in ("x86_64", "i686") and not spec.machine.startswith("q35"):
        reasons.append(f"machine {spec.machine} cannot do Secure Boot (needs q35 with SMM)")
    support = guest_os_rules.get(spec.guest_os, "unsupported")
    if support == "unsupported":
        reasons.append(f"guest OS {spec.guest_os} is not allowed a TPM")

    capability_problems = []
    if not cluster:
        capability_problems.append("no host has reported its capabilities")
    without_swtpm = sorted(host for host, caps in cluster.items() if caps.swtpm_version is None)
    if without_swtpm:
        capability_problems.append(f"hosts without swtpm: {', '.join(without_swtpm)}")
    if override:
        overridden.extend(capability_problems)
    else:
        reasons.extend(capability_problems)

    if reasons or model is None:
        return TpmDecision(reasons=reasons, overridden=overridden)
    return TpmDecision(overridden=overridden, tpm_xml=tpm_element(model))
