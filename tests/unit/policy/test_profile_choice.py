"""Which libtpms profile a cluster's new TPMs are made with: the oldest host's newest one
where every host can pin a profile, a configured one where every host can make it, and
never one a host of the cluster could not load."""

from __future__ import annotations

import pytest

from keeper_policy.tpm.guest_os import DEFAULT_GUEST_OS_ALIASES, DEFAULT_GUEST_OS_RULES
from keeper_policy.tpm.profile_choice import OLDEST_HOST, ProfileChoice, choose_profile
from keeper_policy.tpm.rules import ClusterView, Overrides, decide_tpm, tpm_element
from keeper_shared.messages.host import HostCapabilities
from keeper_shared.messages.tpm import VmSpec


def caps(libvirt: str, libtpms: str | None) -> HostCapabilities:
    return HostCapabilities(
        swtpm_version="0.10.0",
        libtpms_version=libtpms,
        libvirt_version=libvirt,
        architectures=["x86_64"],
        uefi_firmware=True,
    )


DEBIAN_12 = caps("9.0.0", "0.9.2")
LIBTPMS_10 = caps("10.10.0", "0.10.2")
LIBTPMS_11 = caps("11.2.0", "0.11.0")
OLD_LIBVIRT = caps("10.9.0", "0.11.0")
SILENT = caps("11.2.0", None)


@pytest.mark.parametrize(
    ("hosts", "profile"),
    [
        ({"a": LIBTPMS_11, "b": LIBTPMS_11}, "default-v2"),
        ({"a": LIBTPMS_11, "b": LIBTPMS_10}, "default-v1"),
        ({"a": LIBTPMS_11, "b": DEBIAN_12}, None),
        ({"a": LIBTPMS_11, "b": OLD_LIBVIRT}, None),
        ({"a": LIBTPMS_11, "b": SILENT}, None),
        ({}, None),
    ],
)
def test_oldest_host_pins_the_oldest_newest_profile_only_where_every_host_can_pin(
    hosts: dict[str, HostCapabilities], profile: str | None
) -> None:
    assert choose_profile("c", hosts, OLDEST_HOST) == ProfileChoice(profile)


def test_a_configured_profile_is_pinned_where_every_host_makes_it() -> None:
    hosts = {"a": LIBTPMS_11, "b": LIBTPMS_10}
    assert choose_profile("c", hosts, "default-v1") == ProfileChoice("default-v1")
    assert choose_profile("c", hosts, "null") == ProfileChoice("null")


def test_a_configured_profile_some_host_cannot_make_names_those_hosts() -> None:
    hosts = {"a": LIBTPMS_11, "b": LIBTPMS_10, "c": DEBIAN_12}
    choice = choose_profile("prod", hosts, "default-v2")
    assert choice.profile is None
    assert choice.problem == (
        "hosts of cluster prod that cannot make TPMs with its profile default-v2 (libvirt "
        "10.10.0 and a libtpms that implements StateFormatLevel 8 are needed): b, c"
    )


def test_an_unknown_configured_profile_is_refused() -> None:
    assert choose_profile("prod", {"a": LIBTPMS_11}, "default-v9").problem == (
        "cluster prod's TPM profile 'default-v9' is unknown"
    )


def test_the_pinned_profile_goes_into_the_backend_and_none_leaves_it_empty() -> None:
    assert tpm_element("tpm-crb", "default-v1") == (
        "<tpm model='tpm-crb'><backend type='emulator' version='2.0'>"
        '<profile name="default-v1"/></backend></tpm>'
    )
    assert (
        tpm_element("tpm-crb")
        == "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
    )


def test_approval_refuses_a_cluster_that_cannot_make_its_configured_profile_unless_overridden() -> (
    None
):
    vm = VmSpec(vm_id="6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b", name="vm", guest_os="windows-11")
    cluster = ClusterView("prod", {"a": LIBTPMS_11, "b": DEBIAN_12})

    def decide(override: bool) -> tuple[list[str], list[str], str | None]:
        decision = decide_tpm(
            vm,
            rules=DEFAULT_GUEST_OS_RULES,
            aliases=DEFAULT_GUEST_OS_ALIASES,
            cluster=cluster,
            overrides=Overrides(cluster=override),
            profile_setting="default-v2",
        )
        return decision.reasons, decision.overridden, decision.tpm_xml

    reasons, _, xml = decide(override=False)
    assert [reason.split(":")[0] for reason in reasons] == ["cluster-capability"]
    assert reasons[0].endswith("StateFormatLevel 8 are needed): b")
    assert xml is None
    _, overridden, xml = decide(override=True)
    assert len(overridden) == 1
    assert xml == tpm_element("tpm-crb")
