"""Sealing blobs for Redis: the one place that knows how a stored version's ciphertext is
bound (VM id, kind, epoch, generation and hash in the AAD). Reading them back, verified, is
`keeper_state_store.storage.version_reader`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence

from keeper_shared.messages.types import StateBlob
from keeper_state_store.crypto.encryption import blob_associated_data, encrypt_blob
from keeper_state_store.storage.repository import StateRepository


class BlobSealer:
    """Encrypts blobs under their VM's data key, bound to VM, kind, token and hash."""

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
                blob_associated_data(
                    vm_id,
                    blob.kind.value,
                    blob.token.epoch,
                    blob.token.generation,
                    blob.content_hash,
                ),
            )
            for vm_id, blob in blobs
        ]
