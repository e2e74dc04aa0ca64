"""Invariant 10 on the bus: announcing a TPM that changed identity unasked, the end of
such a reset, and ``state.tpm.accept``.

persist.lua judges each TPM version against the VM's own identity as it stores it (see
`keeper_state_store.storage.tpm_trust`); this module turns its verdicts into events, after
the durable write as every store announcement is: ``state.tpm.reset`` when a version is
another TPM, ``state.tpm.reset.cleared`` when the VM's own TPM is stored again, someone
accepted the new one, or a restore asked for a version of another TPM.
"""

from __future__ import annotations

import structlog

from keeper_shared.bus.client import BusClient, Delivery, Route
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import AcceptTpmReply
from keeper_shared.messages.tpm_reset import (
    AcceptTpm,
    ResetClearing,
    ResetFoundBy,
    TpmReset,
    TpmResetCleared,
)
from keeper_state_store.storage.tpm_trust import TpmTrust, TrustOutcome, TrustVerdict

log = structlog.get_logger(__name__)


class TpmResetAnnouncer:
    """Publishes what the identity check found, and serves ``state.tpm.accept``."""

    def __init__(self, trust: TpmTrust, bus: BusClient) -> None:
        self._trust = trust
        self._bus = bus

    def command_routes(self) -> list[Route]:
        """Routes of this service on the store's commands queue."""
        return [Route(AcceptTpm, self.on_accept)]

    async def after_write(self, vm_id: str, version: int, trust: TrustOutcome | None) -> None:
        """Announce what persist.lua found about the TPM version it just stored."""
        if trust is None:
            return
        if trust.verdict is TrustVerdict.RESET:
            await self.announce_pending(vm_id, version)
        elif trust.verdict is TrustVerdict.OWN_BACK:
            log.info(
                "the VM's own TPM is stored again: its reset is over",
                vm_id=vm_id,
                version=version,
                reset_version=trust.reset_version,
            )
            await self._cleared(vm_id, version, ResetClearing.OWN_TPM_BACK, trust.reset_version)

    async def announce_pending(self, vm_id: str, version: int) -> None:
        """Announce the VM's pending reset if ``version`` is its first version (a
        redelivered write announces again: at least once)."""
        pending = await self._trust.pending_reset(vm_id)
        if pending is None or pending.reset_version != version:
            return
        log.warning(
            "TPM replaced unasked: stored, flagged, the VM's own stays the one restored",
            vm_id=vm_id,
            version=version,
            restore_version=pending.restore_version,
            identity_read=pending.identity is not None,
        )
        await self._bus.publish_event(
            TpmReset(
                vm_id=vm_id,
                version=version,
                previous_good_version=pending.restore_version,
                found_by=ResetFoundBy.PERSIST,
                identity=pending.identity,
                previous_identity=pending.previous_identity,
            ),
            subject=vm_id,
        )

    async def after_restore(self, vm_id: str, tpm_version: int) -> None:
        """A restore sends ``tpm_version``: when it is another TPM than the VM's own,
        someone asked for it, so it becomes the VM's own (and a pending reset ends)."""
        trusted = await self._trust.trust_restored(vm_id, tpm_version)
        if trusted is None:
            return
        log.warning(
            "a restore asked for another TPM: it is the VM's own from now on",
            vm_id=vm_id,
            version=tpm_version,
            reset_version=trusted.cleared_reset,
        )
        await self._cleared(vm_id, trusted.newest, ResetClearing.RESTORED, trusted.cleared_reset)

    async def on_accept(self, envelope: Envelope[AcceptTpm], delivery: Delivery) -> AcceptTpmReply:
        """Make the VM's newest TPM its own; old versions stay in the history."""
        request = envelope.data
        trusted = await self._trust.accept_newest(request.vm_id)
        if trusted is None:
            return AcceptTpmReply.failed(f"VM {request.vm_id} has no stored TPM")
        log.warning(
            "newest TPM accepted as the VM's own",
            vm_id=request.vm_id,
            version=trusted.version,
            reset_version=trusted.cleared_reset,
            requested_by=request.requested_by or delivery.user_id,
        )
        await self._cleared(
            request.vm_id, trusted.version, ResetClearing.ACCEPTED, trusted.cleared_reset
        )
        return AcceptTpmReply(ok=True, version=trusted.version, reset_version=trusted.cleared_reset)

    async def _cleared(
        self, vm_id: str, version: int, how: ResetClearing, reset_version: int | None
    ) -> None:
        await self._bus.publish_event(
            TpmResetCleared(vm_id=vm_id, version=version, how=how, reset_version=reset_version),
            subject=vm_id,
        )
