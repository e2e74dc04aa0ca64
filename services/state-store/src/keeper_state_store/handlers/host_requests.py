"""What a host asks the store for itself, when a VM manager other than the keeper starts or
stops a VM there (the libvirt QEMU hook): the VM's newest stored state, verified, to put in
place before the start; and a pull of its final state before libvirt removes the files.

Only the VM's placement host gets its state, and a host speaks only for itself (invariant
3): the broker-validated AMQP user must be the host named in the request.
"""

from __future__ import annotations

import structlog

from keeper_shared.bus.client import Delivery, Route
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.host_requests import NewestState, ReadNewestState
from keeper_shared.messages.replies import RetrieveStateReply
from keeper_shared.messages.state import RetrieveState
from keeper_shared.messages.types import StateKind
from keeper_shared.sealing.keys import SealingPublicKey
from keeper_shared.sealing.state_blobs import seal_state_blob, seal_tpm_secret
from keeper_state_store.crypto.bus_sealing import HostKeyUnknownError
from keeper_state_store.crypto.encryption import DecryptionError
from keeper_state_store.crypto.tpm_secrets import TpmSecretVault
from keeper_state_store.handlers.state import StateService
from keeper_state_store.storage.repository import StateRepository
from keeper_state_store.storage.version_reader import (
    VersionNotKeptError,
    VersionReader,
    VersionUnreadableError,
)
from keeper_state_store.transfer.moving import read_newest

log = structlog.get_logger(__name__)


class HostRequests:
    """Handlers of the store's host-requests queue."""

    def __init__(
        self, repository: StateRepository, state: StateService, *, verify_host_identity: bool
    ) -> None:
        self._repository = repository
        self._state = state
        self._verify = verify_host_identity
        self._reader = VersionReader(repository.redis, repository.keys)
        self._secrets = TpmSecretVault(repository)

    def routes(self) -> list[Route]:
        """Routes of the store's host-requests queue."""
        return [Route(ReadNewestState, self.on_read_newest), Route(RetrieveState, self.on_retrieve)]

    def _impostor(self, delivery: Delivery, host: str) -> str | None:
        if self._verify and delivery.user_id != host:
            return f"sent by AMQP user {delivery.user_id!r}, not by host {host}"
        return None

    async def on_read_newest(
        self, envelope: Envelope[ReadNewestState], delivery: Delivery
    ) -> NewestState:
        """The newest verified version of each kind, for the VM's placement host only."""
        request = envelope.data
        refusal = self._impostor(delivery, request.host)
        stored = await self._repository.placements_and_head_hashes([request.vm_id])
        placement, _ = stored[request.vm_id]
        if refusal is None and (placement is None or placement.host != request.host):
            where = placement.host if placement is not None else "nowhere"
            refusal = f"VM {request.vm_id} is placed on {where}, not on {request.host}"
        if refusal is not None:
            log.warning("newest state refused", vm_id=request.vm_id, reason=refusal)
            return NewestState(vm_id=request.vm_id, refused=refusal)
        if request.sealing_key is not None:
            # The host's own broker user sent it (checked above), as for a heartbeat.
            key = SealingPublicKey.from_text(request.sealing_key)
            await self._state.sealing.hosts.learn(request.host, key)
        try:
            newest = await read_newest(
                self._repository, self._reader, request.vm_id, list(StateKind)
            )
            secret = await self._secrets.held(request.vm_id) if newest else None
            host_key = await self._state.sealing.hosts.key_of(request.host)
        except HostKeyUnknownError as error:
            log.warning("newest state refused", vm_id=request.vm_id, reason=str(error))
            return NewestState(vm_id=request.vm_id, refused=str(error))
        except (VersionNotKeptError, VersionUnreadableError, DecryptionError) as error:
            log.error("stored state does not verify", vm_id=request.vm_id, reason=str(error))
            return NewestState(
                vm_id=request.vm_id, refused=f"stored state does not verify: {error}"
            )
        # Sealed to the requesting host: the reply rests in its reply queue.
        blobs = {
            kind: seal_state_blob(request.vm_id, verified.blob, host_key)
            for kind, verified in newest.items()
        }
        versions = {kind: verified.record.version for kind, verified in newest.items()}
        log.info(
            "newest state given",
            vm_id=request.vm_id,
            host=request.host,
            versions={kind.value: version for kind, version in versions.items()},
        )
        return NewestState(
            vm_id=request.vm_id,
            tpm=blobs.get(StateKind.TPM),
            nvram=blobs.get(StateKind.NVRAM),
            versions=versions,
            tpm_secret=(
                seal_tpm_secret(request.vm_id, secret, host_key) if secret is not None else None
            ),
        )

    async def on_retrieve(
        self, envelope: Envelope[RetrieveState], delivery: Delivery
    ) -> RetrieveStateReply:
        """A host's own request to pull its VM's state now (before libvirt removes it)."""
        refusal = self._impostor(delivery, envelope.data.host)
        if refusal is not None:
            return RetrieveStateReply.failed(refusal)
        return await self._state.on_retrieve(envelope, delivery)
