"""Where a VM may be placed: live hosts with swtpm, never an older swtpm than the one that
last wrote its state unless overridden, and away from a lost host."""

from __future__ import annotations

import pytest

from keeper_policy.hosts.registry import HostRecord
from keeper_policy.placement.rules import (
    check_current_placement,
    check_state_format,
    check_swtpm_version,
    check_tpm_secrets,
    machine_problems,
    target_problems,
)
from keeper_shared.libtpms import NULL_STATE_PROFILE, StateProfile
from keeper_shared.messages.host import HostCapabilities
from keeper_shared.messages.tpm import Firmware, VmSpec

NOW = 1_000_000.0
CAPS = HostCapabilities(
    swtpm_version="0.8.0", libvirt_version="9.0.0", architectures=["x86_64"], uefi_firmware=True
)


def host(**changes: object) -> HostRecord:
    values: dict[str, object] = {"host": "host-b", "capabilities": CAPS, "last_seen": NOW - 1}
    values.update(changes)
    return HostRecord(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (None, "host host-b has never sent a heartbeat"),
        (host(lost_at=NOW - 5, last_seen=NOW - 40), "host host-b is declared lost"),
        (host(last_seen=NOW - 31), "host host-b has sent no heartbeat for 31 s"),
        (
            host(capabilities=CAPS.model_copy(update={"swtpm_version": None})),
            "host host-b has no swtpm",
        ),
    ],
)
def test_target_must_be_live_with_swtpm(record: HostRecord | None, reason: str) -> None:
    (refusal,) = target_problems(record, "host-b", now=NOW, lost_after_s=30)
    assert refusal.startswith(reason)


def test_a_live_host_with_swtpm_is_fine() -> None:
    assert target_problems(host(), "host-b", now=NOW, lost_after_s=30) == []


def test_a_lost_host_without_swtpm_gets_both_reasons() -> None:
    record = host(
        lost_at=NOW - 5,
        last_seen=NOW - 40,
        capabilities=CAPS.model_copy(update={"swtpm_version": None}),
    )
    refusals = target_problems(record, "host-b", now=NOW, lost_after_s=30)
    assert [refusal.split(" (")[0] for refusal in refusals] == [
        "host host-b is declared lost",
        "host host-b has no swtpm",
    ]


VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"
X86_UEFI = VmSpec(vm_id=VM_ID, name="vm", guest_os="windows-11")
PSERIES = VmSpec(
    vm_id=VM_ID,
    name="vm",
    guest_os="rhel-9",
    arch="ppc64le",
    machine="pseries",
    firmware=Firmware.SLOF,
)
ARM_ONLY = CAPS.model_copy(update={"architectures": ["aarch64"]})
NO_OVMF = CAPS.model_copy(update={"uefi_firmware": False})


@pytest.mark.parametrize(
    ("capabilities", "spec", "reasons"),
    [
        (CAPS, X86_UEFI, []),
        (ARM_ONLY, X86_UEFI, ["host host-b runs aarch64, not the VM's x86_64"]),
        (
            NO_OVMF,
            X86_UEFI,
            ["host host-b has no UEFI firmware (OVMF/AAVMF) for the VM's UEFI boot"],
        ),
        (
            ARM_ONLY.model_copy(update={"uefi_firmware": False}),
            X86_UEFI,
            [
                "host host-b runs aarch64, not the VM's x86_64",
                "host host-b has no UEFI firmware (OVMF/AAVMF) for the VM's UEFI boot",
            ],
        ),
        # SLOF comes with QEMU: a pseries VM needs no UEFI firmware on its host.
        (
            CAPS.model_copy(update={"architectures": ["ppc64le"], "uefi_firmware": False}),
            PSERIES,
            [],
        ),
        (CAPS, PSERIES, ["host host-b runs x86_64, not the VM's ppc64le"]),
        (
            CAPS.model_copy(update={"architectures": []}),
            X86_UEFI,
            ["host host-b runs no architecture it reported, not the VM's x86_64"],
        ),
    ],
)
def test_the_host_must_run_the_vms_architecture_and_firmware(
    capabilities: HostCapabilities, spec: VmSpec, reasons: list[str]
) -> None:
    assert machine_problems(host(capabilities=capabilities), "host-b", spec) == reasons


@pytest.mark.parametrize(
    ("host_swtpm", "last_swtpm", "refused"),
    [
        ("0.8.0", None, False),  # never ran anywhere
        ("0.8.0", "0.8.0", False),
        ("0.8.0", "0.8", False),
        ("0.10.0", "0.9.1", False),  # 0.10 is newer, whatever string order says
        ("0.9.1", "0.10.0", True),
        ("0.7.1", "0.8.0", True),
        ("0.8.0-rc1", "0.8.0", True),
        ("unknown", "0.8.0", True),  # cannot compare: refuse rather than guess
    ],
)
def test_swtpm_must_not_be_older(host_swtpm: str, last_swtpm: str | None, refused: bool) -> None:
    check = check_swtpm_version(
        host_id="host-b",
        host_swtpm=host_swtpm,
        last_swtpm=last_swtpm,
        last_host="host-a",
        override=False,
    )
    assert (check.refusal is not None) is refused
    if refused:
        assert check.refusal is not None
        assert host_swtpm in check.refusal
        assert str(last_swtpm) in check.refusal


def test_older_swtpm_refusal_names_both_versions_and_the_override() -> None:
    check = check_swtpm_version(
        host_id="host-b", host_swtpm="0.7.1", last_swtpm="0.8.0", last_host="host-a", override=False
    )
    assert check.refusal == (
        "host host-b runs swtpm 0.7.1, older than swtpm 0.8.0 that last wrote this VM's state "
        "(on host-a); place with override_version to allow it"
    )


def test_override_lets_an_older_swtpm_through_and_says_what_it_skipped() -> None:
    check = check_swtpm_version(
        host_id="host-b", host_swtpm="0.7.1", last_swtpm="0.8.0", last_host="host-a", override=True
    )
    assert check.refusal is None
    assert check.overridden is not None
    assert "older than swtpm 0.8.0" in check.overridden


def test_a_vm_moves_only_from_nowhere_or_from_a_lost_host() -> None:
    alive = host(host="host-a")
    lost = host(host="host-a", lost_at=NOW)
    assert check_current_placement(None, None, "host-b") is None
    assert check_current_placement("host-b", host(), "host-b") is None
    assert check_current_placement("host-a", lost, "host-b") is None
    assert check_current_placement("host-a", alive, "host-b") == (
        "VM is placed on host-a; stop it there first"
    )


def test_an_encrypted_tpm_goes_only_where_libvirt_keeps_secrets() -> None:
    refusal = check_tpm_secrets(host(), "host-b", encrypt_tpm_state=True)
    assert refusal is not None
    assert "host-b's libvirt keeps no secrets" in refusal
    keeps = host(capabilities=CAPS.model_copy(update={"tpm_secrets": True}))
    assert check_tpm_secrets(keeps, "host-b", encrypt_tpm_state=True) is None
    assert check_tpm_secrets(host(), "host-b", encrypt_tpm_state=False) is None


DEFAULT_V1 = StateProfile("default-v1", 7)
DEFAULT_V2 = StateProfile("default-v2", 8)


def with_libtpms(version: str | None) -> HostRecord:
    return host(capabilities=CAPS.model_copy(update={"libtpms_version": version}))


@pytest.mark.parametrize("libtpms", [None, "0.8.2", "0.9.2", "0.10.2", "0.11.0", "0.12.1"])
@pytest.mark.parametrize("profile", [None, NULL_STATE_PROFILE])
def test_state_of_the_null_profile_or_unknown_goes_to_any_libtpms(
    libtpms: str | None, profile: StateProfile | None
) -> None:
    assert check_state_format(with_libtpms(libtpms), "host-b", profile) is None


@pytest.mark.parametrize(
    ("libtpms", "profile", "loads"),
    [
        ("0.10.0", DEFAULT_V1, True),
        ("0.11.0", DEFAULT_V1, True),
        ("0.13.0", DEFAULT_V2, True),
        ("0.9.2", DEFAULT_V1, False),
        ("0.10.2", DEFAULT_V2, False),
    ],
)
def test_a_profile_goes_only_where_libtpms_loads_its_state_format_level(
    libtpms: str, profile: StateProfile, loads: bool
) -> None:
    refusal = check_state_format(with_libtpms(libtpms), "host-b", profile)
    if loads:
        assert refusal is None
    else:
        assert refusal is not None
        assert f"host host-b runs libtpms {libtpms}, which loads up to StateFormatLevel" in refusal
        assert f"profile {profile.name}) needs StateFormatLevel {profile.state_format_level}" in (
            refusal
        )


def test_a_host_that_does_not_report_libtpms_gets_no_state_above_level_1() -> None:
    refusal = check_state_format(with_libtpms(None), "host-b", DEFAULT_V1)
    assert refusal is not None
    assert refusal.startswith("host host-b does not report its libtpms version")


def test_a_libtpms_version_that_is_no_version_is_refused_with_what_it_said() -> None:
    refusal = check_state_format(with_libtpms("git-abc"), "host-b", DEFAULT_V1)
    assert refusal is not None
    assert "reports libtpms 'git-abc', not a version, and" in refusal
