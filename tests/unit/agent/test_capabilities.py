"""What a host reports it can run: policy places a VM only on a host that names its
architecture."""

from __future__ import annotations

import pytest

from keeper_host_agent.hypervisor.capabilities import guest_architectures


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
