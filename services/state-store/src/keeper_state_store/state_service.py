"""The store's behaviour: pull what changed, verify, encrypt, persist fenced, announce.

A ``state.changed`` event is acknowledged only after the durable write (or after deciding
there is nothing to write), so a replica killed mid-way means redelivery to another one, and
the fenced write makes the second attempt a no-op when the first had landed.
"""

from __future__ import annotations

import asyncio

import structlog
from pydantic import SecretBytes

from keeper_shared.blobs import open_blob
from keeper_shared.bus.client import BusClient, CallError, Delivery
from keeper_shared.bus.topology import host_command_key
from keeper_shared.compression import BlobFormatError
from keeper_shared.encryption import blob_associated_data, decrypt_blob, encrypt_blob
from keeper_shared.messages.commands import CommandDone
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.state import (
    FetchState,
    RestoreState,
    RetrieveState,
    StateChanged,
    StateFetched,
    StatePersisted,
    StateWriteRefused,
)
from keeper_shared.messages.types import StateBlob, StateKind
from keeper_shared.messages.vm import PrepareVm
from keeper_state_store.repository import StateRepository, WriteOutcome
from keeper_state_store.settings import StateStoreSettings

log = structlog.get_logger(__name__)


class StateService:
    """Handlers of one state-store replica."""

    def __init__(
        self, settings: StateStoreSettings, repository: StateRepository, bus: BusClient
    ) -> None:
        self._settings = settings
        self._repository = repository
        self._bus = bus

    async def on_state_changed(self, envelope: Envelope[StateChanged], delivery: Delivery) -> None:
        """Pull the announced state unless it is already stored or the host may not write it."""
        change = envelope.data
        if await self._repository.head_hash(change.vm_id, change.kind) == change.content_hash:
            return
        placement = await self._repository.placement(change.vm_id)
        if placement is None or placement.host != change.host:
            await self._refuse(
                change.vm_id, change.kind, change.host, "host is not the VM's placement"
            )
            return
        await self.pull_and_persist(change.host, [change.vm_id], [change.kind])

    async def on_heartbeat(self, envelope: Envelope[HostHeartbeat], delivery: Delivery) -> None:
        """Reconcile: pull any hash in the host's inventory that the store has not seen, so a
        lost event costs at most one heartbeat."""
        beat = envelope.data
        behind: list[str] = []
        for entry in beat.vms:
            placement = await self._repository.placement(entry.vm_id)
            if placement is None or placement.host != beat.host or placement.epoch != entry.epoch:
                continue
            for kind, announced in (
                (StateKind.TPM, entry.tpm_hash),
                (StateKind.NVRAM, entry.nvram_hash),
            ):
                if announced is not None and announced != await self._repository.head_hash(
                    entry.vm_id, kind
                ):
                    behind.append(entry.vm_id)
                    break
        if behind:
            log.info("reconciling from heartbeat", host=beat.host, vms=len(behind))
            await self.pull_and_persist(beat.host, behind, list(StateKind))

    async def on_retrieve(
        self, envelope: Envelope[RetrieveState], delivery: Delivery
    ) -> CommandDone:
        """Pull the VM's state now (before a destroy) and report the newest stored versions."""
        request = envelope.data
        try:
            await self.pull_and_persist(request.host, [request.vm_id], list(StateKind))
        except (CallError, BlobFormatError) as error:
            return CommandDone(ok=False, error=str(error))
        versions = {}
        for kind in StateKind:
            version = await self._repository.head_version(request.vm_id, kind)
            if version is not None:
                versions[kind.value] = str(version)
        return CommandDone(ok=True, detail=versions)

    async def on_restore(self, envelope: Envelope[RestoreState], delivery: Delivery) -> CommandDone:
        """Send the newest stored state to the host the VM is about to start on."""
        request = envelope.data
        blobs: dict[StateKind, StateBlob] = {}
        for kind in StateKind:
            version = await self._repository.head_version(request.vm_id, kind)
            if version is not None:
                blobs[kind] = await self._load_blob(request.vm_id, kind, version)
        prepare = PrepareVm(
            vm_id=request.vm_id,
            name=request.name,
            epoch=request.epoch,
            tpm=blobs.get(StateKind.TPM),
            nvram=blobs.get(StateKind.NVRAM),
        )
        try:
            reply = await self._bus.call(
                host_command_key(request.host),
                prepare,
                CommandDone,
                subject=request.vm_id,
                timeout_s=self._settings.prepare_timeout_s,
            )
        except CallError as error:
            return CommandDone(ok=False, error=str(error))
        return reply.data

    async def _load_blob(self, vm_id: str, kind: StateKind, version: int) -> StateBlob:
        found = await self._repository.read_version(vm_id, kind, version)
        if found is None:
            raise LookupError(f"{kind} version {version} of {vm_id} is not stored")
        record, sealed = found
        data_key = await self._repository.data_key(vm_id)
        associated = blob_associated_data(
            vm_id, kind.value, record.token.epoch, record.token.generation, record.content_hash
        )
        compressed = decrypt_blob(data_key, sealed, associated)
        blob = StateBlob(
            kind=kind,
            content_hash=record.content_hash,
            size=record.size,
            token=record.token,
            compressed=SecretBytes(compressed),
        )
        # Never hand out what does not verify: a restore from a corrupt version must fail here.
        await asyncio.to_thread(open_blob, blob)
        return blob

    async def pull_and_persist(self, host: str, vm_ids: list[str], kinds: list[StateKind]) -> None:
        """Fetch the VMs' stable state from ``host`` in one call and persist each blob."""
        reply = await self._bus.call(
            host_command_key(host),
            FetchState(vm_ids=vm_ids, kinds=kinds),
            StateFetched,
            subject=vm_ids[0],
            timeout_s=self._settings.fetch_timeout_s,
        )
        for vm_state in reply.data.vms:
            for blob in vm_state.blobs:
                await self._persist_blob(vm_state.vm_id, host, blob)

    async def _persist_blob(self, vm_id: str, host: str, blob: StateBlob) -> None:
        try:
            await asyncio.to_thread(open_blob, blob)
        except BlobFormatError as error:
            await self._refuse(vm_id, blob.kind, host, f"blob does not verify: {error}")
            return
        data_key = await self._repository.data_key(vm_id)
        associated = blob_associated_data(
            vm_id, blob.kind.value, blob.token.epoch, blob.token.generation, blob.content_hash
        )
        sealed = encrypt_blob(data_key, blob.compressed.get_secret_value(), associated)
        result = await self._repository.write_version(
            vm_id=vm_id,
            kind=blob.kind,
            host=host,
            token=blob.token,
            content_hash=blob.content_hash,
            size=blob.size,
            sealed=sealed,
        )
        if result.outcome is WriteOutcome.STORED:
            version = int(result.detail)
            log.info(
                "state persisted",
                vm_id=vm_id,
                kind=blob.kind.value,
                version=version,
                content_hash=blob.content_hash[:12],
                epoch=blob.token.epoch,
            )
            await self._bus.publish_event(
                StatePersisted(
                    vm_id=vm_id,
                    kind=blob.kind,
                    content_hash=blob.content_hash,
                    size=blob.size,
                    token=blob.token,
                    version=version,
                    host=host,
                ),
                subject=vm_id,
            )
        elif result.outcome is not WriteOutcome.DUPLICATE:
            await self._refuse(vm_id, blob.kind, host, f"{result.outcome.value} ({result.detail})")

    async def _refuse(self, vm_id: str, kind: StateKind, host: str, reason: str) -> None:
        log.warning("write refused", vm_id=vm_id, kind=kind.value, from_host=host, reason=reason)
        await self._bus.publish_event(
            StateWriteRefused(vm_id=vm_id, kind=kind, host=host, reason=reason), subject=vm_id
        )
