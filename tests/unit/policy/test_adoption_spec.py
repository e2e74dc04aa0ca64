"""From a host's `vm.discovered` to the spec the approval rules judge (pure)."""

from __future__ import annotations

import pytest

from keeper_policy.adoption.spec import (
    adoption_spec,
    adopts_by_itself,
    explain_guest_os,
    guest_os_from_osinfo,
    not_by_itself_reason,
)
from keeper_policy.tpm.guest_os import DEFAULT_GUEST_OS_ALIASES, DEFAULT_GUEST_OS_RULES
from keeper_policy.tpm.rules import ClusterView, Overrides, decide_tpm
from keeper_shared.messages.adoption import AdoptionMode, DomainSpecRead, VmDiscovered
from keeper_shared.messages.host import HostCapabilities
from keeper_shared.messages.tpm import Firmware

VM_ID = "4b2c7d5e-1f3a-4c6b-9d8e-7f6a5b4c3d2e"
CLUSTER = ClusterView(
    "default",
    {
        "h1": HostCapabilities(
            swtpm_version="0.9.0",
            libvirt_version="10.0.0",
            architectures=["x86_64"],
            uefi_firmware=True,
        )
    },
)


def discovered(**changes: object) -> VmDiscovered:
    spec = {
        "arch": "x86_64",
        "machine": "pc-q35-8.2",
        "firmware": Firmware.UEFI,
        "memory_mib": 4096,
        "tpm_model": "tpm-crb",
        "tpm_version": "2.0",
        "tpm_emulated": True,
        "secure_boot": True,
        "smm": True,
        "tpm_secret_uuid": None,
        "osinfo_id": "http://microsoft.com/win/11",
    }
    fact = {
        "vm_id": VM_ID,
        "host": "h1",
        "name": "win11",
        "running": True,
        "marked": False,
        "guest_os": None,
        "adoption": AdoptionMode.ALL,
    }
    for key, value in changes.items():
        (spec if key in spec else fact)[key] = value
    return VmDiscovered.model_validate({**fact, "spec": DomainSpecRead.model_validate(spec)})


@pytest.mark.parametrize(
    ("osinfo", "guest_os"),
    [
        ("http://microsoft.com/win/11", "win11"),
        ("http://microsoft.com/win/2k22", "win2k22"),
        ("http://redhat.com/rhel/9.2", "rhel-9.2"),
        ("http://ubuntu.com/ubuntu/22.04", "ubuntu-22.04"),
        ("http://libosinfo.org/unknown", None),
    ],
)
def test_osinfo_ids_become_guest_os_ids(osinfo: str, guest_os: str | None) -> None:
    assert guest_os_from_osinfo(osinfo) == guest_os


NO_OVERRIDES = Overrides()


def decide(fact: VmDiscovered, overrides: Overrides = NO_OVERRIDES) -> list[str]:
    reading = adoption_spec(fact)
    assert reading.spec is not None
    decision = decide_tpm(
        reading.spec,
        rules=DEFAULT_GUEST_OS_RULES,
        aliases=DEFAULT_GUEST_OS_ALIASES,
        cluster=CLUSTER,
        overrides=overrides,
    )
    return reading.problems + explain_guest_os(decision.reasons, reading.guest_os_known)


def test_a_windows_11_uefi_domain_passes_the_rules() -> None:
    reading = adoption_spec(discovered())
    assert reading.spec is not None
    assert (reading.spec.guest_os, reading.spec.machine, reading.spec.secure_boot) == (
        "win11",
        "pc-q35-8.2",
        True,
    )
    assert not reading.spec.encrypt_tpm_state
    assert decide(discovered()) == []


def test_the_request_and_the_marker_name_the_guest_os_before_libosinfo() -> None:
    fact = discovered(guest_os="windows-server-2022")
    assert adoption_spec(fact).spec.guest_os == "windows-server-2022"  # type: ignore[union-attr]
    assert adoption_spec(fact, "rhel-9.2").spec.guest_os == "rhel-9.2"  # type: ignore[union-attr]


def test_a_domain_naming_no_guest_os_is_told_how_to_name_one() -> None:
    reasons = decide(discovered(osinfo_id=None))
    assert len(reasons) == 1
    assert reasons[0].startswith("guest-os: the domain names no guest OS")
    assert "--guest-os" in reasons[0]
    assert decide(discovered(osinfo_id=None), Overrides(guest_os=True)) == []


def test_a_bios_domain_with_tpm_1_2_fails_every_rule_it_breaks() -> None:
    reasons = decide(discovered(firmware=Firmware.BIOS, tpm_version="1.2", secure_boot=False))
    assert [reason.split(":")[0] for reason in reasons] == ["firmware", "tpm-version"]


def test_only_an_emulated_tpm_is_adopted() -> None:
    reasons = decide(discovered(tpm_emulated=False, tpm_model=None, tpm_version=None))
    assert reasons == ["tpm: the domain has no emulated TPM (swtpm) for vTPM Keeper to protect"]


def test_a_name_that_cannot_be_a_file_name_cannot_be_judged() -> None:
    reading = adoption_spec(discovered(name="my windows vm"))
    assert reading.spec is None
    assert reading.problems == ["domain: its name cannot be used by vTPM Keeper"]


@pytest.mark.parametrize(
    ("mode", "marked", "adopts"),
    [
        (AdoptionMode.ALL, False, True),
        (AdoptionMode.MARKED, True, True),
        (AdoptionMode.MARKED, False, False),
        (AdoptionMode.NONE, True, False),
    ],
)
def test_the_hosts_mode_decides_what_is_adopted_by_itself(
    mode: AdoptionMode, marked: bool, adopts: bool
) -> None:
    fact = discovered(adoption=mode, marked=marked)
    assert adopts_by_itself(fact) is adopts
    if not adopts:
        assert "keeper vm adopt win11" in not_by_itself_reason(fact)
