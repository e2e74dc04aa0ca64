"""osinfo-style guest-OS rules and the version comparison under them."""

from __future__ import annotations

import pytest

from keeper_policy.settings import PolicySettings
from keeper_policy.tpm.guest_os import (
    DEFAULT_GUEST_OS_ALIASES,
    DEFAULT_GUEST_OS_RULES,
    GuestOsRule,
    guest_os_support,
    split_guest_os,
)
from keeper_policy.versions import VersionError, parse_version
from keeper_shared.messages.tpm import OsTpmSupport

SUPPORTED, REQUIRED, UNSUPPORTED = (
    OsTpmSupport.SUPPORTED,
    OsTpmSupport.REQUIRED,
    OsTpmSupport.UNSUPPORTED,
)


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        ("0.7.1", "0.8.0"),
        ("0.9", "0.10"),  # not string order
        ("0.10.0-rc1", "0.10.0"),  # a release candidate comes before its release
        ("2012", "2012r2"),  # a revision comes after
        ("8", "8.1"),
        ("9.2", "10"),
    ],
)
def test_versions_order(smaller: str, larger: str) -> None:
    assert parse_version(smaller) < parse_version(larger)
    assert parse_version(larger) > parse_version(smaller)


def test_trailing_zeros_do_not_count() -> None:
    assert parse_version("0.8") == parse_version("0.8.0")
    assert parse_version("v1.2") == parse_version("1.2.0")


@pytest.mark.parametrize("text", ["", "abc", "1..2", "1.2 beta 3", "-1"])
def test_nonsense_is_not_a_version(text: str) -> None:
    with pytest.raises(VersionError):
        parse_version(text)


@pytest.mark.parametrize(
    ("guest_os", "family", "version"),
    [
        ("windows-11", "windows", "11"),
        ("windows-server-2022", "windows-server", "2022"),
        ("win2k12r2", "windows-server", "2012r2"),
        ("rhel-9.4", "rhel", "9.4"),
        ("RHEL-8", "rhel", "8"),
    ],
)
def test_guest_os_ids_split(guest_os: str, family: str, version: str) -> None:
    assert split_guest_os(guest_os, DEFAULT_GUEST_OS_ALIASES) == (family, parse_version(version))


@pytest.mark.parametrize(
    ("guest_os", "support"),
    [
        ("windows-7", UNSUPPORTED),
        ("windows-8", SUPPORTED),  # oVirt's windows_8
        ("windows-8.1", SUPPORTED),
        ("windows-10", SUPPORTED),
        ("windows-11", REQUIRED),
        ("windows-12", REQUIRED),
        ("windows-server-2008", UNSUPPORTED),
        ("windows-server-2012", SUPPORTED),
        ("windows-2019", SUPPORTED),
        ("windows-server-2022", SUPPORTED),  # oVirt: inherited from 2012, not required
        ("win2k25", SUPPORTED),
        ("rhel-6.10", UNSUPPORTED),
        ("rhel-7", SUPPORTED),
        ("rhel-10", SUPPORTED),
        ("debian-12", UNSUPPORTED),
        ("ubuntu-24.04", UNSUPPORTED),
        ("freebsd", UNSUPPORTED),
    ],
)
def test_default_rules(guest_os: str, support: OsTpmSupport) -> None:
    verdict = guest_os_support(guest_os, DEFAULT_GUEST_OS_RULES, DEFAULT_GUEST_OS_ALIASES)
    assert verdict.support is support, verdict.explanation


@pytest.mark.parametrize(
    ("ovirt_os", "support"),
    [
        # Every os id oVirt's osinfo-defaults.properties marks (or inherits) as allowing a
        # TPM, and some it leaves unsupported.
        ("windows_8", SUPPORTED),
        ("windows_8x64", SUPPORTED),
        ("windows_10", SUPPORTED),
        ("windows_10x64", SUPPORTED),
        ("windows_11", REQUIRED),
        ("windows_2012x64", SUPPORTED),
        ("windows_2012R2x64", SUPPORTED),
        ("windows_2016x64", SUPPORTED),
        ("windows_2019x64", SUPPORTED),
        ("windows_2022", SUPPORTED),
        ("windows_2025", SUPPORTED),
        ("rhel_7x64", SUPPORTED),
        ("rhel_8x64", SUPPORTED),
        ("rhel_9x64", SUPPORTED),
        ("rhel_10x64", SUPPORTED),
        ("rhel_7_ppc64", SUPPORTED),
        ("rhel_9_ppc64", SUPPORTED),
        ("rhel_7_s390x", SUPPORTED),  # allowed by the OS; the architecture rule refuses it
        ("rhcos_x64", SUPPORTED),
        ("other_linux_kernel_4", SUPPORTED),
        ("windows_7x64", UNSUPPORTED),
        ("windows_2008R2x64", UNSUPPORTED),
        ("rhel_6x64", UNSUPPORTED),
        ("sles_11", UNSUPPORTED),
        ("ubuntu_18_04", UNSUPPORTED),
        ("debian_9", UNSUPPORTED),
        ("other_linux", UNSUPPORTED),
    ],
)
def test_ovirt_os_ids_get_ovirts_sample_support(ovirt_os: str, support: OsTpmSupport) -> None:
    verdict = guest_os_support(ovirt_os, DEFAULT_GUEST_OS_RULES, DEFAULT_GUEST_OS_ALIASES)
    assert verdict.support is support, verdict.explanation


def test_rules_are_configurable_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "KEEPER_POLICY_GUEST_OS_RULES",
        '[{"family": "debian", "min_version": "12", "support": "supported"}]',
    )
    rules = PolicySettings().guest_os_rules
    assert rules == [GuestOsRule(family="debian", min_version="12", support=SUPPORTED)]
    assert guest_os_support("debian-12", rules, {}).support is SUPPORTED
    assert guest_os_support("debian-11", rules, {}).support is UNSUPPORTED
    assert guest_os_support("windows-11", rules, {}).support is UNSUPPORTED  # replaced
