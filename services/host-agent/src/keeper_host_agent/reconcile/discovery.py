"""The ``vm.discovered`` fact for a TPM/UEFI domain vTPM Keeper did not place."""

from __future__ import annotations

from keeper_host_agent.hypervisor.domain_spec import read_domain_spec
from keeper_host_agent.hypervisor.port import DomainSnapshot
from keeper_shared.messages.adoption import AdoptionMode, VmDiscovered


def discovered(snapshot: DomainSnapshot, *, host: str, adoption: AdoptionMode) -> VmDiscovered:
    """The fact for ``snapshot``, with this host's adoption mode."""
    reading = read_domain_spec(snapshot.xml)
    return VmDiscovered(
        vm_id=snapshot.vm_id,
        host=host,
        name=snapshot.name,
        spec=reading.spec,
        running=snapshot.active,
        marked=reading.marked,
        guest_os=reading.guest_os,
        adoption=adoption,
    )
