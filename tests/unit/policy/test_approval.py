"""TPM approval rules: architecture x firmware x guest OS x cluster capability x override,
every combination, and every rejection names its rule and its reason."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from keeper_policy.tpm.guest_os import DEFAULT_GUEST_OS_ALIASES, DEFAULT_GUEST_OS_RULES
from keeper_policy.tpm.rules import ClusterView, Overrides, Rule, TpmDecision, decide_tpm
from keeper_shared.messages.host import HostCapabilities
from keeper_shared.messages.tpm import Firmware, OsTpmSupport, VmSpec

VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"
CAPABLE = HostCapabilities(
    swtpm_version="0.7.1", libvirt_version="9.0.0", architectures=["x86_64"], uefi_firmware=True
)
NO_SWTPM = CAPABLE.model_copy(update={"swtpm_version": None})


def spec(**changes: object) -> VmSpec:
    values: dict[str, object] = {"vm_id": VM_ID, "name": "vm", "guest_os": "windows-11"}
    values.update(changes)
    return VmSpec.model_validate(values)


NO_OVERRIDES = Overrides()


def decide(vm: VmSpec, cluster: ClusterView, overrides: Overrides = NO_OVERRIDES) -> TpmDecision:
    return decide_tpm(
        vm,
        rules=DEFAULT_GUEST_OS_RULES,
        aliases=DEFAULT_GUEST_OS_ALIASES,
        cluster=cluster,
        overrides=overrides,
    )


def rules_named(texts: list[str]) -> set[str]:
    return {text.split(":", 1)[0] for text in texts}


# --- the whole matrix ---------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    arch: str
    machine: str
    model: str | None
    """None: no TPM model on this architecture."""
    firmware: Firmware | None
    """The firmware its TPM works with; None where there is no TPM."""


ARCHES = [
    Arch("x86_64", "q35", "tpm-crb", Firmware.UEFI),
    Arch("i686", "pc-i440fx-7.2", "tpm-crb", Firmware.UEFI),
    Arch("aarch64", "virt", "tpm-tis", Firmware.UEFI),
    Arch("ppc64le", "pseries", "tpm-spapr", Firmware.SLOF),
    Arch("ppc64", "pseries-8.2", "tpm-spapr", Firmware.SLOF),
    Arch("s390x", "s390-ccw-virtio", None, None),
]
GUEST_OSES = {
    # id: (support, reason fragment when unsupported)
    "windows-11": (OsTpmSupport.REQUIRED, None),
    "win2k22": (OsTpmSupport.SUPPORTED, None),
    "windows-10": (OsTpmSupport.SUPPORTED, None),
    "windows-8": (OsTpmSupport.SUPPORTED, None),
    "windows-2012": (OsTpmSupport.SUPPORTED, None),
    "rhel-7": (OsTpmSupport.SUPPORTED, None),
    "rhel-9.4": (OsTpmSupport.SUPPORTED, None),
    "windows-7": (OsTpmSupport.UNSUPPORTED, "windows 7 is below 8"),
    "rhel-6.10": (OsTpmSupport.UNSUPPORTED, "rhel 6.10 is below 7"),
    "debian-12": (OsTpmSupport.UNSUPPORTED, "no rule allows a TPM for the debian family"),
    "msdos": (OsTpmSupport.UNSUPPORTED, "not a `<family>-<version>` id"),
}
CLUSTERS = {
    "all-swtpm": (ClusterView("prod", {"a": CAPABLE, "b": CAPABLE}), None),
    "one-without": (
        ClusterView("prod", {"a": CAPABLE, "b": NO_SWTPM}),
        "hosts of cluster prod without swtpm: b",
    ),
    "empty": (ClusterView("prod", {}), "no live host of cluster prod has reported"),
}
OVERRIDES = [
    Overrides(),
    Overrides(cluster=True),
    Overrides(guest_os=True),
    Overrides(cluster=True, guest_os=True),
]


@pytest.mark.parametrize(
    ("arch", "firmware", "guest_os", "cluster_name", "overrides"),
    list(itertools.product(ARCHES, list(Firmware), GUEST_OSES, CLUSTERS, OVERRIDES)),
    ids=lambda value: getattr(value, "arch", None) or str(value),
)
def test_matrix(
    arch: Arch, firmware: Firmware, guest_os: str, cluster_name: str, overrides: Overrides
) -> None:
    support, os_reason = GUEST_OSES[guest_os]
    cluster, cluster_reason = CLUSTERS[cluster_name]
    vm = spec(arch=arch.arch, machine=arch.machine, firmware=firmware, guest_os=guest_os)

    decision = decide(vm, cluster, overrides)

    # What must be refused, with which words, and what an override moves aside.
    refused: dict[str, str] = {}
    skipped: dict[str, str] = {}
    if arch.model is None:
        # No TPM device at all: its firmware is not worth a second reason.
        refused[Rule.ARCHITECTURE] = f"architecture {arch.arch} has no TPM model"
    elif firmware is not arch.firmware:
        refused[Rule.FIRMWARE] = (
            f"needs UEFI firmware, the VM has {firmware}"
            if arch.firmware is Firmware.UEFI
            else f"works with SLOF firmware, the VM has {firmware}"
        )
    if os_reason is not None:
        (skipped if overrides.guest_os else refused)[Rule.GUEST_OS] = os_reason
    if cluster_reason is not None:
        (skipped if overrides.cluster else refused)[Rule.CLUSTER] = cluster_reason

    assert rules_named(decision.reasons) == set(refused), decision.reasons
    for rule, words in refused.items():
        assert any(text.startswith(f"{rule}: ") and words in text for text in decision.reasons)
    assert rules_named(decision.overridden) == set(skipped), decision.overridden
    for rule, words in skipped.items():
        assert any(text.startswith(f"{rule}: ") and words in text for text in decision.overridden)
    assert decision.guest_os_support is support
    if refused:
        assert not decision.approved
        assert decision.tpm_xml is None
    else:
        assert decision.approved
        assert decision.tpm_xml == (
            f"<tpm model='{arch.model}'><backend type='emulator' version='2.0'/></tpm>"
        )


# --- single rules, exactly ------------------------------------------------------------------

CAPABLE_CLUSTER = ClusterView("default", {"a": CAPABLE})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"tpm_version": "1.2"}, "tpm-version: only TPM 2.0 is emulated, TPM 1.2 asked"),
        (
            {"secure_boot": True, "machine": "pc-i440fx-7.2"},
            "secure-boot: Secure Boot needs a q35 machine, not pc-i440fx-7.2",
        ),
        ({"secure_boot": True, "smm": False}, "secure-boot: Secure Boot needs SMM turned on"),
        (
            {"firmware": Firmware.BIOS},
            "firmware: TPM emulation needs UEFI firmware, the VM has bios",
        ),
        ({"arch": "s390x"}, "architecture: architecture s390x has no TPM model"),
        (
            {"arch": "s390x", "machine": "s390-ccw-virtio", "firmware": Firmware.BIOS},
            "architecture: architecture s390x has no TPM model",
        ),
        (
            {"firmware": Firmware.SLOF},
            "firmware: TPM emulation needs UEFI firmware, the VM has slof",
        ),
        (
            {"arch": "ppc64le", "machine": "pseries"},
            "firmware: a pseries TPM (tpm-spapr) works with SLOF firmware, the VM has uefi",
        ),
        (
            {"arch": "ppc64le", "machine": "powernv", "firmware": Firmware.SLOF},
            "machine: tpm-spapr needs a pseries machine, not powernv",
        ),
        (
            {"arch": "ppc64", "machine": "pseries", "firmware": Firmware.SLOF, "secure_boot": True},
            "secure-boot: pseries has no UEFI Secure Boot",
        ),
        (
            {"arch": "aarch64", "machine": "sbsa-ref"},
            "machine: aarch64's TPM needs the virt machine, not sbsa-ref",
        ),
    ],
)
def test_hard_rules_name_their_reason(changes: dict[str, object], reason: str) -> None:
    decision = decide(spec(**changes), CAPABLE_CLUSTER, Overrides(cluster=True, guest_os=True))
    assert decision.reasons == [reason]


@pytest.mark.parametrize(
    "changes",
    [
        {"secure_boot": True},  # q35 with SMM
        {"secure_boot": True, "machine": "pc-q35-8.2"},
        {"secure_boot": False, "machine": "pc-i440fx-7.2"},  # no Secure Boot: any machine
        {"secure_boot": True, "smm": False, "arch": "aarch64", "machine": "virt"},  # no SMM on Arm
    ],
)
def test_secure_boot_needs_q35_and_smm_on_x86_only(changes: dict[str, object]) -> None:
    assert decide(spec(**changes), CAPABLE_CLUSTER).approved


@pytest.mark.parametrize(
    ("arch", "machine", "firmware", "model"),
    [
        ("x86_64", "q35", Firmware.UEFI, "tpm-crb"),
        ("aarch64", "virt-8.2", Firmware.UEFI, "tpm-tis"),
        ("ppc64le", "pseries", Firmware.SLOF, "tpm-spapr"),
        ("ppc64", "pseries-8.2", Firmware.SLOF, "tpm-spapr"),
    ],
)
def test_each_architecture_gets_its_tpm_with_its_own_firmware(
    arch: str, machine: str, firmware: Firmware, model: str
) -> None:
    decision = decide(
        spec(arch=arch, machine=machine, firmware=firmware, guest_os="rhel-9"), CAPABLE_CLUSTER
    )
    assert decision.approved, decision.reasons
    assert decision.tpm_xml == (
        f"<tpm model='{model}'><backend type='emulator' version='2.0'/></tpm>"
    )


def test_every_failed_rule_is_reported() -> None:
    vm = spec(
        firmware=Firmware.BIOS,
        machine="pc",
        secure_boot=True,
        smm=False,
        tpm_version="1.2",
        guest_os="msdos-6",
    )
    decision = decide(vm, ClusterView("default", {"b": NO_SWTPM}))
    assert rules_named(decision.reasons) == {
        Rule.FIRMWARE,
        Rule.TPM_VERSION,
        Rule.SECURE_BOOT,
        Rule.GUEST_OS,
        Rule.CLUSTER,
    }
    assert len(decision.reasons) == 6  # Secure Boot fails twice: machine and SMM


def test_override_is_returned_for_the_approval_event() -> None:
    decision = decide(
        spec(guest_os="debian-12"),
        ClusterView("lab", {"b": NO_SWTPM}),
        Overrides(cluster=True, guest_os=True),
    )
    assert decision.approved
    assert decision.overridden == [
        "guest-os: not allowed a TPM: no rule allows a TPM for the debian family",
        "cluster-capability: hosts of cluster lab without swtpm: b",
    ]


def test_overrides_never_skip_hard_rules() -> None:
    decision = decide(
        spec(firmware=Firmware.BIOS), CAPABLE_CLUSTER, Overrides(cluster=True, guest_os=True)
    )
    assert not decision.approved
    assert rules_named(decision.reasons) == {Rule.FIRMWARE}


# --- encrypted TPM state ------------------------------------------------------------------

WITH_SECRETS = CAPABLE.model_copy(update={"tpm_secrets": True})


def test_an_encrypted_tpm_needs_every_live_host_to_keep_libvirt_secrets() -> None:
    encrypted = spec(encrypt_tpm_state=True)
    mixed = ClusterView("prod", {"hv1": WITH_SECRETS, "hv2": CAPABLE})

    refused = decide(encrypted, mixed)

    assert not refused.approved
    (reason,) = refused.reasons
    assert reason.startswith(f"{Rule.CLUSTER.value}: ")
    assert "keeps no secrets" in reason
    assert "hv2" in reason
    assert "hv1" not in reason
    assert decide(spec(), mixed).approved  # only the encryption needs secrets
    assert decide(encrypted, ClusterView("prod", {"hv1": WITH_SECRETS})).approved


def test_an_override_skips_the_secrets_rule_and_records_it() -> None:
    decision = decide(
        spec(encrypt_tpm_state=True),
        ClusterView("prod", {"hv2": CAPABLE}),
        Overrides(cluster=True),
    )
    assert decision.approved
    assert any("keeps no secrets" in skipped for skipped in decision.overridden)
