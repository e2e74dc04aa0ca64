"""A bundle passphrase sealed to the store by the client that exports or imports.

The bundle is encrypted with the passphrase, so a passphrase in clear next to it (in
``state.import``), or in the ``state.export`` that precedes the bundle's reply, would undo
that encryption for anyone who reads the broker's disk or a dead-letter queue. Bound to:

- an export: the VM exported;
- an import: the target VM (empty for the bundle's own) and the sha256 of the bundle, so
  the sealed passphrase cannot be moved next to another bundle.
"""

from __future__ import annotations

import hashlib

from pydantic import SecretStr

from keeper_shared.messages.sealed import SealedBlob
from keeper_shared.sealing.construction import SealBinding, SealingError, open_sealed, seal
from keeper_shared.sealing.keys import SealingPrivateKeys, SealingPublicKey
from keeper_shared.sealing.wire import to_payload, to_sealed_blob

PASSPHRASE_KIND = "bundle-passphrase"  # noqa: S105 (the binding's label, not a password)


def export_binding(vm_id: str) -> SealBinding:
    """What the passphrase of an export of ``vm_id`` is bound to."""
    return SealBinding(vm_id, PASSPHRASE_KIND, "state.export", "")


def import_binding(bundle: bytes, target_vm_id: str | None) -> SealBinding:
    """What the passphrase of an import of ``bundle`` is bound to."""
    digest = hashlib.sha256(bundle).hexdigest()
    return SealBinding(target_vm_id or "", PASSPHRASE_KIND, "state.import", digest)


def seal_passphrase(
    passphrase: str, receiver: SealingPublicKey, binding: SealBinding
) -> SealedBlob:
    """``passphrase`` sealed to the store's key under ``binding``."""
    return to_sealed_blob(seal(passphrase.encode(), receiver, binding))


def open_passphrase(
    sealed: SealedBlob, keys: SealingPrivateKeys, binding: SealBinding
) -> SecretStr:
    """The passphrase in ``sealed``; `SealingError` when it does not open (or is not
    UTF-8, which a passphrase sealed by `seal_passphrase` always is)."""
    clear = open_sealed(to_payload(sealed), keys, binding)
    try:
        return SecretStr(clear.decode())
    except UnicodeDecodeError:
        raise SealingError(f"sealed {binding.kind} is not text") from None
