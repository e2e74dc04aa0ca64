"""Sealing blobs for Redis and opening them again, verified.

One place knows how a stored version's ciphertext is bound (VM id, kind, epoch, generation,
hash in the AAD), so every path that reads state (restore, export, clone) checks it the same
way: decrypt, decompress (bounded), compare size and hash. Nothing unverified leaves the
store.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import SecretBytes

from keeper_shared.messages.types import FencingToken, StateBlob, StateKind
from keeper_shared.runtime.cpu_work import run_sized
from keeper_shared.state_format.blobs import open_blob
from keeper_state_store.crypto.encryption import blob_associated_data, decrypt_blob, encrypt_blob
from keeper_state_store.storage.repository import StateRepository, VersionRecord


class VersionNotKeptError(LookupError):
    """The requested version is neither in the history nor pinned by a snapshot."""


class BlobVault:
    """Encrypts blobs for one VM's key and binding, and opens stored versions verified."""

    def __init__(self, repository: StateRepository) -> None:
        self._repository = repository

    async def seal(self, vm_id: str, blob: StateBlob) -> bytes:
        """Encrypt ``blob``'s compressed content under ``vm_id``'s data key, bound to the VM,
        the blob's kind, token and hash."""
        (sealed,) = await self.seal_all([(vm_id, blob)])
        return sealed

    async def seal_all(self, blobs: Sequence[tuple[str, StateBlob]]) -> list[bytes]:
        """`seal` of each (VM, blob), reading every VM's data key in one round trip."""
        data_keys = await self._repository.data_keys({vm_id for vm_id, _ in blobs})
        return [
            encrypt_blob(
                data_keys[vm_id],
                blob.compressed.get_secret_value(),
                _binding(vm_id, blob.kind, blob.token, blob.content_hash),
            )
            for vm_id, blob in blobs
        ]

    async def open_version(
        self, vm_id: str, kind: StateKind, version: int
    ) -> tuple[VersionRecord, StateBlob]:
        """A stored version as a verified blob.

        Raises `VersionNotKeptError`, `DecryptionError` (wrong key, or a ciphertext that
        belongs to another VM, kind or version) or `BlobFormatError` (size or hash)."""
        found = await self._repository.read_version(vm_id, kind, version)
        if found is None:
            raise VersionNotKeptError(f"{kind} version {version} of {vm_id} is not kept")
        record, sealed = found
        data_key = await self._repository.data_key(vm_id)
        associated = _binding(vm_id, kind, record.token, record.content_hash)
        blob = StateBlob(
            kind=kind,
            content_hash=record.content_hash,
            size=record.size,
            token=record.token,
            compressed=SecretBytes(decrypt_blob(data_key, sealed, associated)),
        )
        await run_sized(blob.size, open_blob, blob)
        return record, blob


def _binding(vm_id: str, kind: StateKind, token: FencingToken, content_hash: str) -> bytes:
    return blob_associated_data(vm_id, kind.value, token.epoch, token.generation, content_hash)
