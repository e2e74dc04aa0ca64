"""A command the host agent carries out for policy after a live migration: take the new
placement epoch for a domain that is already running here.

A migrated domain arrives with the XML (and so the epoch) it had on the source. Policy moves
the placement here under a new epoch, which fences the source; until this host stamps its
announcements with the new epoch the store refuses them too. The epoch lives in the domain's
`<metadata>`, where every other part of the agent reads it, so it is rewritten there (live
and persistent definition) and the domain is re-read, which re-announces its state under it.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable

import libvirt
import structlog

from keeper_host_agent.hypervisor.libvirt_adapter import HypervisorError
from keeper_shared.bus.client import Delivery
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.commands import CommandDone
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.vm_control import SetPlacementEpoch

log = structlog.get_logger(__name__)

METADATA_KEY = "keeper"
"""The namespace prefix libvirt writes for our `<metadata>` element."""


class EpochRefusedError(ValueError):
    """The domain already runs under a newer epoch than the one asked for."""


def current_epoch(domain: libvirt.virDomain) -> int:
    """The placement epoch in the domain's metadata; 0 when it has none."""
    try:
        text = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, PLACEMENT_NAMESPACE, 0)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return 0
        raise
    element = ET.fromstring(text)  # noqa: S314 - libvirt's own serialisation of our element
    try:
        return max(0, int(element.get("epoch", "0")))
    except ValueError:
        return 0


def set_placement_epoch(connection: libvirt.virConnect, vm_id: str, epoch: int) -> int:
    """Write ``epoch`` into the domain's metadata (live and persistent); returns the epoch it
    had. Blocking: run it in a worker thread. Never lowers the epoch."""
    domain = connection.lookupByUUIDString(vm_id)
    previous = current_epoch(domain)
    if previous > epoch:
        raise EpochRefusedError(f"domain runs under epoch {previous}, newer than {epoch}")
    if previous == epoch:
        return previous
    flags = 0
    if domain.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    if domain.isPersistent():
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    domain.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        f"<placement epoch='{epoch}'/>",
        METADATA_KEY,
        PLACEMENT_NAMESPACE,
        flags,
    )
    return previous


class PlacementCommands:
    """Handler of ``vm.set-epoch``.

    ``connection`` returns the agent's live libvirt connection (it changes after a
    reconnect); ``refresh`` re-reads one domain into the agent's tracker."""

    def __init__(
        self,
        connection: Callable[[], libvirt.virConnect],
        refresh: Callable[[str], Awaitable[None]],
    ) -> None:
        self._connection = connection
        self._refresh = refresh

    async def set_epoch(
        self, envelope: Envelope[SetPlacementEpoch], _delivery: Delivery
    ) -> CommandDone:
        """Take the new epoch; the state is re-announced under it."""
        request = envelope.data
        try:
            connection = self._connection()
            previous = await asyncio.to_thread(
                set_placement_epoch, connection, request.vm_id, request.epoch
            )
        except (libvirt.libvirtError, HypervisorError, EpochRefusedError) as error:
            log.warning(
                "epoch not taken", vm_id=request.vm_id, epoch=request.epoch, reason=str(error)
            )
            return CommandDone(ok=False, error=str(error))
        if previous != request.epoch:
            await self._refresh(request.vm_id)
            log.info(
                "placement epoch taken", vm_id=request.vm_id, epoch=request.epoch, previous=previous
            )
        return CommandDone(ok=True, detail={"epoch": str(request.epoch), "previous": str(previous)})
