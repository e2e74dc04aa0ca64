"""TPM approval rules: every rejection names its reason."""

from __future__ import annotations

import pytest

from keeper_policy.approval import decide_tpm
from keeper_shared.messages.host import HostCapabilities
from keeper_shared.messages.tpm import Firmware, VmSpec

VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"
RULES = {"windows-11": "required", "rhel-9": "supported", "msdos-6": "unsupported"}
CAPABLE = HostCapabilities(
    swtpm_version="0.7.1", libvirt_version="9.0.0", architectures=["x86_64"], uefi_firmware=True
)
NO_SWTPM = CAPABLE.model_copy(update={"swtpm_version": None})


def spec(**changes: object) -> VmSpec:
    values: dict[str, object] = {"vm_id": VM_ID, "name": "vm", "guest_os": "windows-11"}
    values.update(changes)
    return VmSpec.model_validate(values)


@pytest.mark.parametrize(
    ("vm", "cluster", "override", "reason", "model"),
    [
        (spec(), {"a": CAPABLE}, False, None, "tpm-crb"),
        (spec(guest_os="rhel-9"), {"a": CAPABLE}, False, None, "tpm-crb"),
        (spec(arch="ppc64le", machine="pseries"), {"a": CAPABLE}, False, None, "tpm-spapr"),
        (spec(firmware=Firmware.BIOS), {"a": CAPABLE}, False, "needs UEFI", None),
        (
            spec(arch="s390x", machine="s390-ccw-virtio"),
            {"a": CAPABLE},
            False,
            "no TPM model",
            None,
        ),
        (spec(machine="pc-i440fx-7.2"), {"a": CAPABLE}, False, "needs q35", None),
        (spec(guest_os="msdos-6"), {"a": CAPABLE}, False, "not allowed a TPM", None),
        (spec(guest_os="unknown-os"), {"a": CAPABLE}, False, "not allowed a TPM", None),
        (spec(), {}, False, "no host has reported", None),
        (spec(), {"a": CAPABLE, "b": NO_SWTPM}, False, "hosts without swtpm: b", None),
        (spec(), {"a": CAPABLE, "b": NO_SWTPM}, True, None, "tpm-crb"),
        (spec(), {}, True, None, "tpm-crb"),
        (spec(firmware=Firmware.BIOS), {"b": NO_SWTPM}, True, "needs UEFI", None),
    ],
)
def test_rules(
    vm: VmSpec,
    cluster: dict[str, HostCapabilities],
    override: bool,
    reason: str | None,
    model: str | None,
) -> None:
    decision = decide_tpm(vm, guest_os_rules=RULES, cluster=cluster, override=override)
    if reason is None:
        assert decision.approved, decision.reasons
        assert (
            decision.tpm_xml
            == f"<tpm model='{model}'><backend type='emulator' version='2.0'/></tpm>"
        )
    else:
        assert not decision.approved
        assert decision.tpm_xml is None
        assert any(reason in text for text in decision.reasons), decision.reasons


def test_every_failed_rule_is_reported() -> None:
    vm = spec(firmware=Firmware.BIOS, machine="pc", guest_os="msdos-6")
    decision = decide_tpm(vm, guest_os_rules=RULES, cluster={}, override=False)
    assert len(decision.reasons) == 4


def test_override_is_recorded() -> None:
    decision = decide_tpm(spec(), guest_os_rules=RULES, cluster={"b": NO_SWTPM}, override=True)
    assert decision.approved
    assert decision.overridden == ["hosts without swtpm: b"]
