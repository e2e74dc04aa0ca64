"""The libvirt secret each encrypted-TPM VM's state is encrypted with, kept by the store.

swtpm encrypts the state with the value of a libvirt secret (usage ``vtpm``); the state is
useless on a host without it. The store creates a random value once per VM (or keeps the
one a host read from a secret the keeper did not create), seals it under the VM's data key
like the state itself, and hands it out only inside the ``vm.prepare`` for the host the VM
is about to start on. Redis sees only ciphertext; no log line or event carries the value.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import uuid

from pydantic import SecretBytes
from redis.asyncio.client import Pipeline

from keeper_shared.messages.types import TpmSecret
from keeper_shared.redis_access.keys import tpm_secret_key
from keeper_shared.redis_access.results import awaited
from keeper_state_store.crypto.encryption import (
    DataKey,
    decrypt_blob,
    encrypt_blob,
    tpm_secret_associated_data,
)
from keeper_state_store.storage.replication import run_replicated
from keeper_state_store.storage.repository import StateRepository

SECRET_ENTROPY_BYTES = 32
"""Random bytes behind a new secret value (libvirt hands it to swtpm as a passphrase, so it
is kept printable: URL-safe base64 of these)."""


def new_secret_value() -> bytes:
    """A fresh random passphrase for swtpm's state encryption."""
    return secrets.token_urlsafe(SECRET_ENTROPY_BYTES).encode("ascii")


def open_tpm_secret(vm_id: str, stored: bytes, data_key: DataKey) -> TpmSecret:
    """A secret record as stored under `tpm_secret_key`, opened with the VM's data key.
    Raises `DecryptionError` when it does not open (wrong key, VM or UUID, or tampered)."""
    record = json.loads(stored)
    secret_uuid = str(record["uuid"])
    value = decrypt_blob(
        data_key,
        base64.b64decode(record["sealed"]),
        tpm_secret_associated_data(vm_id, secret_uuid),
    )
    return TpmSecret(uuid=secret_uuid, value=SecretBytes(value))


class TpmSecretVault:
    """Sealed TPM secrets in Redis, one per VM."""

    def __init__(self, repository: StateRepository) -> None:
        self._repository = repository

    async def held(self, vm_id: str) -> TpmSecret | None:
        """The VM's secret, opened and verified; None when the store holds none."""
        stored = await awaited(self._repository.redis.get(tpm_secret_key(vm_id)))
        if stored is None:
            return None
        return open_tpm_secret(vm_id, bytes(stored), await self._repository.data_key(vm_id))

    async def held_or_created(
        self, vm_id: str, *, value: bytes | None = None, secret_uuid: str | None = None
    ) -> TpmSecret:
        """The VM's secret, created on first use: with ``value`` (a clone's or an import's
        state is encrypted with its source's) or a random one, under ``secret_uuid`` or a
        new UUID. Two replicas racing agree on one: only the first SET NX wins and both
        read back the winner."""
        held = await self.held(vm_id)
        if held is not None:
            return held
        candidate = TpmSecret(
            uuid=secret_uuid or str(uuid.uuid4()),
            value=SecretBytes(value if value is not None else new_secret_value()),
        )
        await self._write(vm_id, candidate, only_if_absent=True)
        held = await self.held(vm_id)
        if held is None:
            raise RuntimeError(f"TPM secret of {vm_id} vanished right after it was written")
        return held

    async def keep(self, vm_id: str, secret: TpmSecret) -> bool:
        """Store the secret a host read from the VM's domain (one the keeper did not create)
        unless the same one is held already; True when it was written."""
        held = await self.held(vm_id)
        if (
            held is not None
            and held.uuid == secret.uuid
            and hmac.compare_digest(held.value.get_secret_value(), secret.value.get_secret_value())
        ):
            return False
        await self._write(vm_id, secret, only_if_absent=False)
        return True

    async def _write(self, vm_id: str, secret: TpmSecret, *, only_if_absent: bool) -> None:
        data_key = await self._repository.data_key(vm_id)
        sealed = encrypt_blob(
            data_key,
            secret.value.get_secret_value(),
            tpm_secret_associated_data(vm_id, secret.uuid),
        )
        record = json.dumps({"uuid": secret.uuid, "sealed": base64.b64encode(sealed).decode()})

        # Replicated before it is used: a host's state encrypted with a secret a Redis
        # failover then lost could never be opened again.
        async def queue(pipe: Pipeline) -> None:
            pipe.set(tpm_secret_key(vm_id), record, nx=only_if_absent)

        await run_replicated(self._repository.redis, self._repository.replicas, queue)
