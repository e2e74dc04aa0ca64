"""Handlers for state that leaves its VM: ``vm.clone``, ``state.export``, ``state.import``.

What moves is read verified and stored as the target's first state (see
`keeper_state_store.transfer.moving`); nothing is stored before all of it verified.

A TPM state swtpm encrypted with a libvirt secret goes nowhere without that secret's value:
an export seals it in the bundle with the state, and a copied TPM (clone, import) gives the
target the same value (under its own secret UUID unless the VM keeps its id).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TypeVar

import structlog
from pydantic import SecretBytes, SecretStr

from keeper_shared.bus.client import Delivery, Route
from keeper_shared.messages.envelope import Envelope
from keeper_shared.messages.replies import CloneVmReply, FirstStateReply, ImportStateReply
from keeper_shared.messages.sealed import SealedBlob
from keeper_shared.messages.state import VersionOrigin
from keeper_shared.messages.transfer import (
    MAX_PASSPHRASE_CHARS,
    MIN_PASSPHRASE_CHARS,
    CloneTpm,
    CloneVm,
    ExportState,
    ImportState,
    StateExported,
)
from keeper_shared.messages.types import StateBlob, StateKind
from keeper_shared.runtime.cpu_work import run_sized
from keeper_shared.sealing.construction import SealBinding, SealingError
from keeper_shared.sealing.keys import SealingPrivateKeys
from keeper_shared.sealing.passphrases import export_binding, import_binding, open_passphrase
from keeper_shared.state_format.blobs import open_blob
from keeper_state_store.crypto.encryption import DecryptionError
from keeper_state_store.crypto.sealing import BlobSealer
from keeper_state_store.crypto.tpm_secrets import TpmSecretVault
from keeper_state_store.identity.fingerprint import archive_identity
from keeper_state_store.storage.repository import InitialOutcome, StateRepository
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
from keeper_state_store.transfer.moving import read_newest, store_first_state

log = structlog.get_logger(__name__)

FirstStateT = TypeVar("FirstStateT", bound=FirstStateReply)

_UNREADABLE = (VersionNotKeptError, VersionUnreadableError, DecryptionError)


class TransferService:
    """Clone, export and import for one store replica."""

    def __init__(self, repository: StateRepository, sealing_keys: SealingPrivateKeys) -> None:
        """``sealing_keys``: the store's own, which open the passphrases clients seal."""
        self._repository = repository
        self._sealing_keys = sealing_keys
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

    async def on_clone(self, envelope: Envelope[CloneVm], delivery: Delivery) -> CloneVmReply:
        """Give the target the source's newest TPM and NVRAM (copy) or its NVRAM only
        (fresh: the target's TPM is manufactured anew, a new identity)."""
        request = envelope.data
        source, target = request.source_vm_id, request.target_vm_id
        if source == target:
            return CloneVmReply.failed("a VM cannot be cloned onto itself")
        kinds = (
            [StateKind.TPM, StateKind.NVRAM] if request.tpm is CloneTpm.COPY else [StateKind.NVRAM]
        )
        try:
            newest = await read_newest(self._repository, self._reader, source, kinds)
        except _UNREADABLE as error:
            return CloneVmReply.failed(f"source state does not verify: {error}")
        if not newest:
            wanted = " or ".join(kind.value for kind in kinds)
            return CloneVmReply.failed(f"source VM {source} has no stored {wanted}")
        blobs = {kind: verified.blob for kind, verified in newest.items()}
        try:
            secret = await self._secrets.held(source) if StateKind.TPM in blobs else None
        except DecryptionError as error:
            return CloneVmReply.failed(f"source TPM secret does not verify: {error}")
        reply = await self._store_initial(
            target,
            blobs,
            VersionOrigin.CLONE,
            source,
            secret.value if secret else None,
            CloneVmReply,
        )
        if reply.ok and secret is not None:
            await self._secrets.held_or_created(target, value=secret.value.get_secret_value())
        if reply.ok:
            log.info("VM cloned", source_vm_id=source, vm_id=target, tpm=request.tpm.value)
        return reply

    async def on_export(self, envelope: Envelope[ExportState], delivery: Delivery) -> StateExported:
        """The VM's newest state in one passphrase-encrypted bundle."""
        request = envelope.data
        try:
            passphrase = self._passphrase(request.passphrase, export_binding(request.vm_id))
        except SealingError as error:
            return StateExported(vm_id=request.vm_id, error=f"passphrase refused: {error}")
        try:
            newest = await read_newest(
                self._repository, self._reader, request.vm_id, list(StateKind)
            )
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
                    blob=verified.blob,
                    version=verified.record.version,
                    host=verified.record.host,
                    stored_at=verified.record.stored_at,
                )
                for verified in newest.values()
            ),
            tpm_secret=secret,
        )
        try:
            data = await asyncio.to_thread(write_bundle, bundle, passphrase.get_secret_value())
        except BundleError as error:
            return StateExported(vm_id=request.vm_id, error=str(error))
        log.info("state exported", vm_id=request.vm_id, kinds=sorted(newest), size=len(data))
        return StateExported(vm_id=request.vm_id, bundle=SecretBytes(data))

    async def on_import(
        self, envelope: Envelope[ImportState], delivery: Delivery
    ) -> ImportStateReply:
        """Verify the bundle completely, then store it as the target's first state."""
        request = envelope.data
        data = request.bundle.get_secret_value()
        try:
            passphrase = self._passphrase(
                request.passphrase, import_binding(data, request.target_vm_id)
            )
        except SealingError as error:
            return ImportStateReply.failed(f"passphrase refused: {error}")
        try:
            bundle = await asyncio.to_thread(read_bundle, data, passphrase.get_secret_value())
        except BundleError as error:
            log.warning("bundle refused", reason=str(error))
            return ImportStateReply.failed(f"bundle refused: {error}")
        target = request.target_vm_id or bundle.vm_id
        blobs = {entry.blob.kind: entry.blob for entry in bundle.entries}
        reply = await self._store_initial(
            target,
            blobs,
            VersionOrigin.IMPORT,
            bundle.vm_id,
            bundle.tpm_secret.value if bundle.tpm_secret else None,
            ImportStateReply,
        )
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

    def _passphrase(self, sealed: SealedBlob, binding: SealBinding) -> SecretStr:
        """The bundle passphrase the client sealed to the store; `SealingError` when it does
        not open or is not of a passphrase's length."""
        passphrase = open_passphrase(sealed, self._sealing_keys, binding)
        if not MIN_PASSPHRASE_CHARS <= len(passphrase.get_secret_value()) <= MAX_PASSPHRASE_CHARS:
            raise SealingError(
                f"a passphrase has {MIN_PASSPHRASE_CHARS} to {MAX_PASSPHRASE_CHARS} characters"
            )
        return passphrase

    async def _store_initial(
        self,
        target: str,
        blobs: dict[StateKind, StateBlob],
        origin: VersionOrigin,
        source: str,
        tpm_passphrase: SecretBytes | None,
        reply: type[FirstStateT],
    ) -> FirstStateT:
        tpm = blobs.get(StateKind.TPM)
        identity = (
            None
            if tpm is None
            else archive_identity(
                await run_sized(tpm.size, open_blob, tpm),
                tpm_passphrase.get_secret_value() if tpm_passphrase is not None else None,
            )
        )
        outcome = await store_first_state(
            self._repository,
            self._sealer,
            target,
            blobs,
            origin=origin,
            source_vm_id=source,
            tpm_identity=identity.fingerprint or "" if identity is not None else "",
        )
        if outcome is InitialOutcome.EXISTS:
            return reply.failed(f"VM {target} already has stored state; refusing to overwrite it")
        return reply(
            ok=True,
            vm_id=target,
            versions=dict.fromkeys(blobs, 1),
            already_stored=outcome is InitialOutcome.DUPLICATE,
        )
