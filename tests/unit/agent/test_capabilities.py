"""What a host reports it can run: policy places a VM only on a host that names its
architecture, and its template asks for KVM only where libvirt offers it."""

from __future__ import annotations

from pathlib import Path

import pytest

from keeper_host_agent.hypervisor.capabilities import (
    guest_architectures,
    kvm_emulates_smm,
    runs_kvm,
)


@pytest.mark.parametrize(
    ("host_arch", "guests"),
    [
        ("x86_64", ["x86_64", "i686"]),
        ("aarch64", ["aarch64"]),
        ("ppc64le", ["ppc64le"]),
        ("s390x", ["s390x"]),
    ],
)
def test_a_host_runs_its_own_architecture_and_what_its_cpu_runs_natively(
    host_arch: str, guests: list[str]
) -> None:
    assert guest_architectures(host_arch) == guests


def libvirt_capabilities(*guests: tuple[str, str, tuple[str, ...]]) -> str:
    """A capabilities document with (os type, arch, domain types) guests."""
    body = "".join(
        f"<guest><os_type>{os_type}</os_type><arch name='{arch}'><wordsize>64</wordsize>"
        + "".join(f"<domain type='{kind}'/>" for kind in kinds)
        + "</arch></guest>"
        for os_type, arch, kinds in guests
    )
    return f"<capabilities><host><cpu><arch>x86_64</arch></cpu></host>{body}</capabilities>"


@pytest.mark.parametrize(
    ("capabilities", "kvm"),
    [
        (libvirt_capabilities(("hvm", "x86_64", ("qemu", "kvm"))), True),
        (
            libvirt_capabilities(("hvm", "i686", ("qemu", "kvm")), ("hvm", "x86_64", ("qemu",))),
            False,
        ),
        (libvirt_capabilities(("hvm", "aarch64", ("qemu", "kvm"))), False),
        (libvirt_capabilities(("xen", "x86_64", ("kvm",))), False),
        (libvirt_capabilities(("hvm", "i686", ("test",))), False),
        ("not a capabilities document <", False),
    ],
    ids=["kvm", "kvm-only-for-another-arch", "foreign-arch", "not-hvm", "test-driver", "garbage"],
)
def test_kvm_is_reported_only_where_libvirt_offers_it_for_the_hosts_arch(
    capabilities: str, kvm: bool
) -> None:
    assert runs_kvm(capabilities, "x86_64") is kvm


@pytest.mark.parametrize("device", [Path("/nonexistent/kvm"), Path("/dev/null")])
def test_smm_under_kvm_is_not_claimed_without_a_kvm_device_that_says_so(device: Path) -> None:
    assert kvm_emulates_smm(device) is False
