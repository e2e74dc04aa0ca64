"""``vm.revert-domain``: go back to a snapshot with memory on this host.

Policy has had the store put the snapshot's pinned TPM and NVRAM in place (a prepare, as
for any start) and sends the domain XML under the VM's new placement epoch with the
snapshot's XML it kept. The agent defines the domain, has libvirt take the snapshot back
when an undefine dropped it, and brings the memory back (see
``hypervisor.libvirt_memory_snapshots``); the guest then runs on the TPM and NVRAM the
memory expects, announcing its state under the new epoch.
"""

from __future__ import annotations

import structlog

from keeper_host_agent.commands.placement import METADATA_PREFIX
from keeper_host_agent.commands.vm_lifecycle import start_xml
from keeper_host_agent.hypervisor.domain_xml import DomainXmlError
from keeper_host_agent.hypervisor.errors import HypervisorError
from keeper_host_agent.hypervisor.port import Hypervisor
from keeper_host_agent.settings import HostAgentSettings
from keeper_shared.bus.client import Delivery
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import RevertDomainReply
from keeper_shared.messages.vm_control import RevertDomain

log = structlog.get_logger(__name__)


class RevertCommands:
    """Handler of ``vm.revert-domain``."""

    def __init__(self, settings: HostAgentSettings, hypervisor: Hypervisor) -> None:
        self._settings = settings
        self._hypervisor = hypervisor

    async def revert(
        self, envelope: Envelope[RevertDomain], _delivery: Delivery
    ) -> RevertDomainReply:
        """Define the domain and revert it to the snapshot, memory included."""
        request = envelope.data
        try:
            xml = start_xml(request.domain_xml, request.vm_id, request.epoch, self._settings)
        except DomainXmlError as error:
            return RevertDomainReply.failed(str(error))
        existing = await self._hypervisor.domain(request.vm_id)
        if existing is not None and existing.active:
            return RevertDomainReply.failed("the VM runs on this host; it must be off first")
        metadata = (f"<placement epoch='{request.epoch}'/>", METADATA_PREFIX, PLACEMENT_NAMESPACE)
        try:
            await self._hypervisor.revert_to_snapshot(
                xml, request.snapshot_xml, request.snapshot_id, metadata
            )
        except HypervisorError as error:
            log.warning("revert failed", vm_id=request.vm_id, reason=str(error))
            return RevertDomainReply.failed(f"revert to {request.snapshot_id}: {error}")
        log.info(
            "reverted to a snapshot with memory",
            vm_id=request.vm_id,
            snapshot_id=request.snapshot_id,
            epoch=request.epoch,
        )
        return RevertDomainReply(ok=True)
