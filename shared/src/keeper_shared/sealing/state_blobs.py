"""Seal a VM's state and TPM secret for a message, and open them from one.

What each sealed payload is bound to:

- a blob: the VM, its kind, its version's fencing token, its declared content hash and,
  in a command that has one (``vm.prepare``), the command's placement epoch, so a blob
  cannot be moved to another VM, kind, version or start;
- a TPM secret: the VM, the kind ``tpm-secret`` and the secret's UUID (and the command's
  epoch likewise).

The receiver's key id is in every binding (see ``construction``).
"""

from __future__ import annotations

from pydantic import SecretBytes

from keeper_shared.messages.sealed import SealedStateBlob, SealedTpmSecret
from keeper_shared.messages.types import StateBlob, TpmSecret
from keeper_shared.sealing.construction import SealBinding, open_sealed, seal
from keeper_shared.sealing.keys import SealingPrivateKeys, SealingPublicKey
from keeper_shared.sealing.wire import to_payload, to_sealed_blob

TPM_SECRET_KIND = "tpm-secret"  # noqa: S105 (the binding's label, not a password)


def _token_text(epoch: int, generation: int, command_epoch: int | None) -> str:
    version = f"{epoch}.{generation}"
    return version if command_epoch is None else f"{version}/command-epoch-{command_epoch}"


def _blob_binding(
    vm_id: str, blob: StateBlob | SealedStateBlob, command_epoch: int | None
) -> SealBinding:
    token = _token_text(blob.token.epoch, blob.token.generation, command_epoch)
    return SealBinding(vm_id, blob.kind.value, token, blob.content_hash)


def _secret_binding(vm_id: str, secret_uuid: str, command_epoch: int | None) -> SealBinding:
    token = secret_uuid if command_epoch is None else f"{secret_uuid}/command-epoch-{command_epoch}"
    return SealBinding(vm_id, TPM_SECRET_KIND, token, "")


def seal_state_blob(
    vm_id: str, blob: StateBlob, receiver: SealingPublicKey, *, command_epoch: int | None = None
) -> SealedStateBlob:
    """``blob`` with its compressed content sealed to ``receiver``."""
    payload = seal(
        blob.compressed.get_secret_value(), receiver, _blob_binding(vm_id, blob, command_epoch)
    )
    return SealedStateBlob(
        kind=blob.kind,
        content_hash=blob.content_hash,
        size=blob.size,
        token=blob.token,
        sealed=to_sealed_blob(payload),
        swtpm_version=blob.swtpm_version,
    )


def open_state_blob(
    vm_id: str,
    sealed: SealedStateBlob,
    keys: SealingPrivateKeys,
    *,
    command_epoch: int | None = None,
) -> StateBlob:
    """The clear `StateBlob` in ``sealed``; `SealingError` when it does not open under the
    binding its own fields (and ``vm_id``, ``command_epoch``) declare."""
    compressed = open_sealed(
        to_payload(sealed.sealed), keys, _blob_binding(vm_id, sealed, command_epoch)
    )
    return StateBlob(
        kind=sealed.kind,
        content_hash=sealed.content_hash,
        size=sealed.size,
        token=sealed.token,
        compressed=SecretBytes(compressed),
        swtpm_version=sealed.swtpm_version,
    )


def seal_tpm_secret(
    vm_id: str, secret: TpmSecret, receiver: SealingPublicKey, *, command_epoch: int | None = None
) -> SealedTpmSecret:
    """``secret`` with its value sealed to ``receiver``."""
    payload = seal(
        secret.value.get_secret_value(),
        receiver,
        _secret_binding(vm_id, secret.uuid, command_epoch),
    )
    return SealedTpmSecret(uuid=secret.uuid, sealed=to_sealed_blob(payload))


def open_tpm_secret(
    vm_id: str,
    sealed: SealedTpmSecret,
    keys: SealingPrivateKeys,
    *,
    command_epoch: int | None = None,
) -> TpmSecret:
    """The clear `TpmSecret` in ``sealed``; `SealingError` when it does not open."""
    value = open_sealed(
        to_payload(sealed.sealed), keys, _secret_binding(vm_id, sealed.uuid, command_epoch)
    )
    return TpmSecret(uuid=sealed.uuid, value=SecretBytes(value))
