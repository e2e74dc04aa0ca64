"""A command the host agent carries out for policy after a live migration: take the new
placement epoch for a domain that is already running here.

A migrated domain arrives with the XML (and so the epoch) it had on the source. Policy moves
the placement here under a new epoch, which fences the source; until this host stamps its
announcements with the new epoch the store refuses them too. The epoch lives in the domain's
`<metadata>`, where every other part of the agent reads it, so it is rewritten there (live
and persistent definition) and the domain is re-read, which re-announces its state under it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable

import structlog

from keeper_host_agent.hypervisor.errors import HypervisorError
from keeper_host_agent.hypervisor.port import Hypervisor
from keeper_shared.bus.client import Delivery
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import SetPlacementEpochReply
from keeper_shared.messages.vm_control import SetPlacementEpoch

log = structlog.get_logger(__name__)

METADATA_PREFIX = "keeper"
"""The namespace prefix libvirt writes for our `<metadata>` element."""


class EpochRefusedError(ValueError):
    """The domain already runs under a newer epoch than the one asked for."""


def epoch_in(metadata: str | None) -> int:
    """The placement epoch in the domain's `<placement>` metadata element; 0 without one."""
    if metadata is None:
        return 0
    element = ET.fromstring(metadata)  # noqa: S314 - libvirt's own serialisation of our element
    try:
        return max(0, int(element.get("epoch", "0")))
    except ValueError:
        return 0


async def set_placement_epoch(hypervisor: Hypervisor, vm_id: str, epoch: int) -> int:
    """Write ``epoch`` into the domain's metadata; returns the epoch it had. Never lowers
    the epoch."""
    previous = epoch_in(await hypervisor.metadata(vm_id, PLACEMENT_NAMESPACE))
    if previous > epoch:
        raise EpochRefusedError(f"domain runs under epoch {previous}, newer than {epoch}")
    if previous < epoch:
        await hypervisor.set_metadata(
            vm_id, PLACEMENT_NAMESPACE, METADATA_PREFIX, f"<placement epoch='{epoch}'/>"
        )
    return previous


class PlacementCommands:
    """Handler of ``vm.set-epoch``; ``refresh`` re-reads one domain into the agent's
    tracker."""

    def __init__(self, hypervisor: Hypervisor, refresh: Callable[[str], Awaitable[None]]) -> None:
        self._hypervisor = hypervisor
        self._refresh = refresh

    async def set_epoch(
        self, envelope: Envelope[SetPlacementEpoch], _delivery: Delivery
    ) -> SetPlacementEpochReply:
        """Take the new epoch; the state is re-announced under it."""
        request = envelope.data
        try:
            previous = await set_placement_epoch(self._hypervisor, request.vm_id, request.epoch)
        except (HypervisorError, EpochRefusedError) as error:
            log.warning(
                "epoch not taken", vm_id=request.vm_id, epoch=request.epoch, reason=str(error)
            )
            return SetPlacementEpochReply.failed(str(error))
        if previous != request.epoch:
            await self._refresh(request.vm_id)
            log.info(
                "placement epoch taken", vm_id=request.vm_id, epoch=request.epoch, previous=previous
            )
        return SetPlacementEpochReply(ok=True, epoch=request.epoch, previous_epoch=previous)
