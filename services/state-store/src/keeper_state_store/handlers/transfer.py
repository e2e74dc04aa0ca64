"""Handlers for state that leaves its VM: ``vm.clone``, ``state.export``, ``state.import``.

Clones and imports are a VM's first state: stored as version 1 under token (0, 0), only if
the VM has no stored state at all (persist_initial.lua), so they can never overwrite what a
host wrote. The VM id is bound into every ciphertext's AAD, so state moving to another VM is
always decrypted, verified and sealed again under the target's key and binding; a plain copy
of the bytes would not decrypt. Nothing is stored before all of it verified.

A TPM state swtpm encrypted with a libvirt secret goes nowhere without that secret's value:
an export seals it in the bundle with the state, and a copied TPM (clone, import) gives the
target the same value (under its own secret UUID unless the VM keeps its id).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog
from pydantic import SecretBytes

from keeper_shared.bus.client import Delivery, Route
from keeper_shared.messages.commands import CommandDone
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.state import VersionOrigin
from keeper_shared.messages.transfer import (
    CloneTpm,
    CloneVm,
    ExportState,
    ImportState,
    StateExported,
)
from keeper_shared.messages.types import StateBlob, StateKind
from keeper_state_store.crypto.encryption import DecryptionError
from keeper_state_store.crypto.sealing import BlobSealer
from keeper_state_store.crypto.tpm_secrets import TpmSecretVault
from keeper_state_store.storage.repository import (
    INITIAL_TOKEN,
    InitialOutcome,
    InitialVersion,
    StateRepository,
    VersionRecord,
)
from keeper_state_store.storage.version_reader import (
    VersionNotKeptError,
    VersionReader,
    VersionUnreadableError,
)
from keeper_state_store.transfer.bundle import (
    Bundle,
    BundleEntry,
    BundleError,
    read_bundle,
    write_bundle,
)

log = structlog.get_logger(__name__)

_UNREADABLE = (VersionNotKeptError, VersionUnreadableError, DecryptionError)


class TransferService:
    """Clone, export and import for one store replica."""

    def __init__(self, repository: StateRepository) -> None:
        self._repository = repository
        self._reader = VersionReader(repository.redis, repository.keys)
        self._sealer = BlobSealer(repository)
        self._secrets = TpmSecretVault(repository)

    def command_routes(self) -> list[Route]:
        """Routes of this service on the store's commands queue."""
        return [
            Route(CloneVm, self.on_clone),
            Route(ExportState, self.on_export),
            Route(ImportState, self.on_import),
        ]

    async def on_clone(self, envelope: Envelope[CloneVm], delivery: Delivery) -> CommandDone:
        """Give the target the source's newest TPM and NVRAM (copy) or its NVRAM only
        (fresh: the target's TPM is manufactured anew, a new identity)."""
        request = envelope.data
        source, target = request.source_vm_id, request.target_vm_id
        if source == target:
            return CommandDone(ok=False, error="a VM cannot be cloned onto itself")
        kinds = (
            [StateKind.TPM, StateKind.NVRAM] if request.tpm is CloneTpm.COPY else [StateKind.NVRAM]
        )
        try:
            newest = await self._newest(source, kinds)
        except _UNREADABLE as error:
            return CommandDone(ok=False, error=f"source state does not verify: {error}")
        if not newest:
            wanted = " or ".join(kind.value for kind in kinds)
            return CommandDone(ok=False, error=f"source VM {source} has no stored {wanted}")
        blobs = {kind: blob for kind, (_, blob) in newest.items()}
        try:
            secret = await self._secrets.held(source) if StateKind.TPM in blobs else None
        except DecryptionError as error:
            return CommandDone(ok=False, error=f"source TPM secret does not verify: {error}")
        reply = await self._store_initial(target, blobs, VersionOrigin.CLONE, source)
        if reply.ok and secret is not None:
            await self._secrets.held_or_created(target, value=secret.value.get_secret_value())
        if reply.ok:
            log.info("VM cloned", source_vm_id=source, vm_id=target, tpm=request.tpm.value)
        return reply

    async def on_export(self, envelope: Envelope[ExportState], delivery: Delivery) -> StateExported:
        """The VM's newest state in one passphrase-encrypted bundle."""
        request = envelope.data
        try:
            newest = await self._newest(request.vm_id, list(StateKind))
        except _UNREADABLE as error:
            return StateExported(
                vm_id=request.vm_id, error=f"stored state does not verify: {error}"
            )
        if not newest:
            return StateExported(vm_id=request.vm_id, error=f"VM {request.vm_id} has no state")
        try:
            secret = await self._secrets.held(request.vm_id)
        except DecryptionError as error:
            return StateExported(
                vm_id=request.vm_id, error=f"stored TPM secret does not verify: {error}"
            )
        bundle = Bundle(
            vm_id=request.vm_id,
            exported_at=datetime.now(UTC),
            entries=tuple(
                BundleEntry(
                    blob=blob, version=record.version, host=record.host, stored_at=record.stored_at
                )
                for record, blob in newest.values()
            ),
            tpm_secret=secret,
        )
        try:
            data = await asyncio.to_thread(
                write_bundle, bundle, request.passphrase.get_secret_value()
            )
        except BundleError as error:
            return StateExported(vm_id=request.vm_id, error=str(error))
        log.info("state exported", vm_id=request.vm_id, kinds=sorted(newest), size=len(data))
        return StateExported(vm_id=request.vm_id, bundle=SecretBytes(data))

    async def on_import(self, envelope: Envelope[ImportState], delivery: Delivery) -> CommandDone:
        """Verify the bundle completely, then store it as the target's first state."""
        request = envelope.data
        try:
            bundle = await asyncio.to_thread(
                read_bundle,
                request.bundle.get_secret_value(),
                request.passphrase.get_secret_value(),
            )
        except BundleError as error:
            log.warning("bundle refused", reason=str(error))
            return CommandDone(ok=False, error=f"bundle refused: {error}")
        target = request.target_vm_id or bundle.vm_id
        blobs = {entry.blob.kind: entry.blob for entry in bundle.entries}
        reply = await self._store_initial(target, blobs, VersionOrigin.IMPORT, bundle.vm_id)
        if reply.ok and bundle.tpm_secret is not None:
            await self._secrets.held_or_created(
                target,
                value=bundle.tpm_secret.value.get_secret_value(),
                # The same VM keeps its secret's UUID: hosts may still have it defined.
                secret_uuid=bundle.tpm_secret.uuid if target == bundle.vm_id else None,
            )
        if reply.ok:
            log.info("state imported", vm_id=target, source_vm_id=bundle.vm_id)
        return reply

    async def _newest(
        self, vm_id: str, kinds: list[StateKind]
    ) -> dict[StateKind, tuple[VersionRecord, StateBlob]]:
        """The newest version of each kind the VM has, verified."""
        found = {}
        for kind in kinds:
            head = await self._repository.head_version(vm_id, kind)
            if head is not None:
                verified = await self._reader.read(vm_id, kind, head)
                found[kind] = (verified.record, verified.blob)
        return found

    async def _store_initial(
        self, target: str, blobs: dict[StateKind, StateBlob], origin: VersionOrigin, source: str
    ) -> CommandDone:
        versions = {}
        for kind, blob in blobs.items():
            # Re-bound to the target and to the initial token: the AAD names both.
            rebound = blob.model_copy(update={"token": INITIAL_TOKEN})
            versions[kind] = InitialVersion(
                content_hash=blob.content_hash,
                size=blob.size,
                sealed=await self._sealer.seal(target, rebound),
            )
        outcome = await self._repository.write_initial(
            target, versions, origin=origin, source_vm_id=source
        )
        if outcome is InitialOutcome.EXISTS:
            return CommandDone(
                ok=False, error=f"VM {target} already has stored state; refusing to overwrite it"
            )
        detail = {"vm_id": target, **{kind.value: "1" for kind in versions}}
        if outcome is InitialOutcome.DUPLICATE:
            detail["note"] = "already stored"
        return CommandDone(ok=True, detail=detail)
