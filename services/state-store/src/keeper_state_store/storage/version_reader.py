"""The one way a stored version is read back: fetched, opened and verified.

Restore, export, clone and the scrubber all read stored versions here, so what the scrubber
vouches for is exactly what a restore sends. A read takes the version's metadata and sealed
blob from the history hashes and from the snapshot pins (one transaction), the VM's data
key (never created by a read), then decrypts (AES-GCM, bound to VM, kind, token and hash),
decompresses within the recorded size and the kind's bound, and compares the hash with the
recorded one. Nothing unverified leaves the store.

Which copy is used: the history's, and the pinned copy whenever the history's does not open,
because its metadata or its blob is missing or either is damaged. The pinned copy is the
same record and the same ciphertext (see `keeper_state_store.storage.snapshots`), so it is as
good as the history's; a reader that gave up while an intact copy sat beside a broken one
would turn a repairable fault into lost state, and a scrubber that judged differently from
a restore would vouch for, or condemn, bytes a restore never reads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import structlog
from pydantic import SecretBytes
from redis.asyncio import Redis

from keeper_shared.messages.types import StateBlob, StateKind
from keeper_shared.redis_access.keys import (
    data_key_key,
    state_blobs_key,
    state_meta_key,
    state_pinned_blobs_key,
    state_pinned_meta_key,
)
from keeper_shared.redis_access.results import awaited
from keeper_shared.runtime.cpu_work import run_sized
from keeper_shared.state_format.blobs import MAX_CANONICAL_SIZE, content_hash
from keeper_shared.state_format.compression import BlobFormatError, decompress_bounded
from keeper_state_store.crypto.encryption import (
    DataKey,
    DecryptionError,
    WrappedKey,
    blob_associated_data,
    decrypt_blob,
)
from keeper_state_store.crypto.key_ring import KeyRing, UnknownKeyError
from keeper_state_store.storage.repository import VersionRecord
from keeper_state_store.storage.version_meta import VersionMetaError

log = structlog.get_logger(__name__)


class VersionNotKeptError(LookupError):
    """The requested version is neither in the history nor pinned by a snapshot."""


class VersionUnreadableError(Exception):
    """A kept version does not open and verify; the text says why (never with bytes)."""


class VersionCopy(enum.StrEnum):
    """Where a version's record and blob were read from."""

    HISTORY = "history"
    PINNED = "pinned"


@dataclass(frozen=True)
class StoredCopy:
    """One copy of a version as Redis holds it; either part may be missing."""

    where: VersionCopy
    meta: bytes | None
    sealed: bytes | None


@dataclass(frozen=True)
class StoredVersion:
    """A version's copies as read in one transaction, the history's first; a copy of which
    Redis holds neither part is left out."""

    vm_id: str
    kind: StateKind
    version: int
    copies: tuple[StoredCopy, ...]

    def record(self) -> VersionRecord | None:
        """The first copy's metadata that parses (None when none does)."""
        for copy in self.copies:
            if copy.meta is not None:
                try:
                    return VersionRecord.from_meta(self.version, copy.meta)
                except VersionMetaError:
                    continue
        return None


@dataclass(frozen=True)
class VerifiedVersion:
    """A stored version that opened and verified."""

    record: VersionRecord
    blob: StateBlob
    """The compressed content, as a restore or an export sends it."""
    content: bytes
    """The canonical content ``blob`` decompresses to."""
    copy: VersionCopy
    history_fault: str | None = None
    """Why the history's copy was not used, when the pinned copy was."""


def open_stored_version(stored: StoredVersion, data_key: DataKey) -> VerifiedVersion:
    """The first of ``stored``'s copies that opens and verifies; CPU-bound.

    Raises `VersionUnreadableError` naming what failed (for each copy when both did)."""
    faults: list[tuple[VersionCopy, str]] = []
    for copy in stored.copies:
        try:
            verified = _open_copy(stored, copy, data_key)
        except VersionUnreadableError as fault:
            faults.append((copy.where, str(fault)))
            continue
        history_fault = next(
            (reason for where, reason in faults if where is VersionCopy.HISTORY), None
        )
        return replace(verified, history_fault=history_fault)
    if len(faults) == 1:
        raise VersionUnreadableError(faults[0][1])
    raise VersionUnreadableError("; ".join(f"{where} copy: {reason}" for where, reason in faults))


def _open_copy(stored: StoredVersion, copy: StoredCopy, data_key: DataKey) -> VerifiedVersion:
    if copy.meta is None:
        raise VersionUnreadableError("the version's metadata is missing")
    if copy.sealed is None:
        raise VersionUnreadableError("the version's blob is missing")
    kind = stored.kind
    try:
        record = VersionRecord.from_meta(stored.version, copy.meta)
        associated = blob_associated_data(
            stored.vm_id,
            kind.value,
            record.token.epoch,
            record.token.generation,
            record.content_hash,
        )
    except ValueError:  # VersionMetaError included
        raise VersionUnreadableError("the version's metadata is unreadable") from None
    try:
        compressed = decrypt_blob(data_key, copy.sealed, associated)
    except DecryptionError as error:
        raise VersionUnreadableError(f"decryption failed: {error}") from None
    limit = MAX_CANONICAL_SIZE[kind]
    if not 0 <= record.size <= limit:
        raise VersionUnreadableError(f"recorded size {record.size} is outside 0..{limit}")
    try:
        content = decompress_bounded(compressed, record.size)
    except BlobFormatError as error:
        raise VersionUnreadableError(f"decompression failed: {error}") from None
    if len(content) != record.size:
        raise VersionUnreadableError(f"content is {len(content)} bytes, recorded {record.size}")
    actual = content_hash(content)
    if actual != record.content_hash:
        raise VersionUnreadableError(
            f"content hash {actual[:12]} does not match the recorded {record.content_hash[:12]}"
        )
    blob = StateBlob(
        kind=kind,
        content_hash=record.content_hash,
        size=record.size,
        token=record.token,
        compressed=SecretBytes(compressed),
    )
    return VerifiedVersion(record=record, blob=blob, content=content, copy=copy.where)


class VersionReader:
    """Reads stored versions back, verified (see the module's docstring)."""

    def __init__(self, redis: Redis, keys: KeyRing) -> None:
        self._redis = redis
        self._keys = keys

    async def read(self, vm_id: str, kind: StateKind, version: int) -> VerifiedVersion:
        """A kept version, opened and verified.

        Raises `VersionNotKeptError`, `VersionUnreadableError`, or `UnknownKeyError` when
        the VM's data key is wrapped by a KEK this replica does not hold."""
        stored = await self.fetch(vm_id, kind, version)
        if stored is None:
            raise VersionNotKeptError(f"{kind} version {version} of {vm_id} is not kept")
        return await self.open(stored, await self.data_key(vm_id))

    async def fetch(self, vm_id: str, kind: StateKind, version: int) -> StoredVersion | None:
        """A version's copies as Redis holds them, unopened; None when neither is kept."""
        field = str(version)
        # A block, not a bare execute: a Redis Cluster transaction hands its connection
        # back only when the pipeline is reset, and one left out breaks later commands.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(state_meta_key(vm_id, kind), field)
            pipe.hget(state_blobs_key(vm_id, kind), field)
            pipe.hget(state_pinned_meta_key(vm_id, kind), field)
            pipe.hget(state_pinned_blobs_key(vm_id, kind), field)
            meta, sealed, pinned_meta, pinned_sealed = await pipe.execute()
        copies = tuple(
            StoredCopy(
                where,
                bytes(meta) if meta is not None else None,
                bytes(sealed) if sealed is not None else None,
            )
            for where, meta, sealed in (
                (VersionCopy.HISTORY, meta, sealed),
                (VersionCopy.PINNED, pinned_meta, pinned_sealed),
            )
            if meta is not None or sealed is not None
        )
        return StoredVersion(vm_id, kind, version, copies) if copies else None

    async def data_key(self, vm_id: str) -> DataKey:
        """The VM's data key, to read with. A read never creates one: a VM with stored
        versions and no key has lost them, and a new key would only hide that.

        Raises `VersionUnreadableError` when the key is missing or damaged, and
        `UnknownKeyError` when a KEK this replica does not hold wraps it."""
        stored = await awaited(self._redis.get(data_key_key(vm_id)))
        if stored is None:
            raise VersionUnreadableError("the VM's data key is missing")
        try:
            return self._keys.unwrap(WrappedKey.from_bytes(bytes(stored)))
        except UnknownKeyError:
            raise
        except DecryptionError as error:
            raise VersionUnreadableError(f"data key does not unwrap: {error}") from None

    async def open(self, stored: StoredVersion, data_key: DataKey) -> VerifiedVersion:
        """`open_stored_version`, off the event loop when the content is large."""
        record = stored.record()
        size = record.size if record is not None else MAX_CANONICAL_SIZE[stored.kind]
        verified = await run_sized(size, open_stored_version, stored, data_key)
        if verified.history_fault is not None:
            log.warning(
                "history copy of a version does not verify; its pinned copy does",
                vm_id=stored.vm_id,
                kind=stored.kind.value,
                version=stored.version,
                reason=verified.history_fault,
            )
        return verified
