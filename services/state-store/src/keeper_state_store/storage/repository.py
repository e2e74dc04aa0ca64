"""The store's Redis schema: fenced version writes, heads, versions and per-VM data keys.

Every write goes through one Lua script so the fencing check, the version record, the head
and the history trim land together or not at all. Redis only ever sees ciphertext.
Reading versions back is `keeper_state_store.storage.version_reader`'s job.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from importlib import resources
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from keeper_shared.libtpms import StateProfile
from keeper_shared.messages.state import VersionOrigin
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import (
    data_key_key,
    placement_key,
    state_blobs_key,
    state_head_key,
    state_history_key,
    state_identities_key,
    state_identity_trust_key,
    state_meta_key,
)
from keeper_shared.redis_access.results import awaited
from keeper_state_store.crypto.encryption import (
    DataKey,
    WrappedKey,
    new_data_key,
)
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.storage.replication import NO_REPLICAS, ReplicaQuorum, run_replicated
from keeper_state_store.storage.tpm_trust import TpmTrust, TrustOutcome
from keeper_state_store.storage.version_meta import (
    VersionMeta,
    pack_version_meta,
    unpack_version_meta,
)


class WriteOutcome(enum.StrEnum):
    """What the fenced write did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    STALE = "stale"
    WRONG_HOST = "wrong_host"
    STALE_EPOCH = "stale_epoch"


class InitialOutcome(enum.StrEnum):
    """What a first write (clone, import) did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    """The VM already holds exactly this state: a repeated request."""
    EXISTS = "exists"
    """The VM already has other state; nothing was written."""


UNWRAPPED_KEYS_KEPT = 4096
"""Recently unwrapped data keys a store replica remembers (about 0.5 MB for 4,096 VMs)."""

INITIAL_TOKEN = FencingToken(epoch=0, generation=0)
"""Token of a clone's or an import's first version: any real write (epoch >= 1) is newer."""


@dataclass(frozen=True)
class InitialVersion:
    """One kind's first version for :meth:`StateRepository.write_initial` (sealed under
    the target's key for `INITIAL_TOKEN`)."""

    content_hash: str
    size: int
    sealed: bytes
    identity: str = ""
    """The TPM identity fingerprint ('' when unread, or not a TPM)."""


@dataclass(frozen=True, kw_only=True)
class VersionWrite:
    """One new version for :meth:`StateRepository.write_versions`: the blob sealed under the
    VM's data key, and what the fenced write checks it against."""

    vm_id: str
    kind: StateKind
    host: str
    token: FencingToken
    content_hash: str
    size: int
    sealed: bytes
    swtpm_version: str | None = None
    tpm_identity: str | None = None
    """A TPM version's identity fingerprint, '' when it could not be read; None: not
    judged (NVRAM, or a writer that does not read identities)."""
    tpm_profile: StateProfile | None = None
    """A TPM version's libtpms profile, when it could be read."""


@dataclass(frozen=True)
class WriteResult:
    """Outcome of a fenced write and its detail (version, or the placement that refused)."""

    outcome: WriteOutcome
    detail: str
    trust: TrustOutcome | None = None
    """For a stored TPM version written with its identity: what the identity check found
    (see persist.lua); None when it was not judged."""

    @classmethod
    def from_reply(cls, reply: list[bytes]) -> WriteResult:
        """Parse persist.lua's reply."""
        outcome = WriteOutcome(reply[0].decode())
        judged = len(reply) >= 5 and reply[2] != b""
        trust = TrustOutcome.from_reply(*reply[2:5]) if judged else None
        return cls(outcome, reply[1].decode(), trust)


@dataclass(frozen=True, kw_only=True)
class VersionRecord(VersionMeta):
    """Metadata of one stored version (everything but the bytes), with its number."""

    version: int

    @classmethod
    def from_meta(cls, version: int, raw: bytes) -> VersionRecord:
        """Parse the metadata stored beside a version (packed, or JSON from earlier
        releases); raises `VersionMetaError` when it is malformed."""
        meta = unpack_version_meta(raw)
        return cls(
            version=version, **{field.name: getattr(meta, field.name) for field in fields(meta)}
        )


def version_meta(
    *,
    content_hash: str,
    size: int,
    token: FencingToken,
    host: str,
    origin: VersionOrigin = VersionOrigin.HOST,
    source_vm_id: str | None = None,
    swtpm_version: str | None = None,
    tpm_profile: StateProfile | None = None,
) -> bytes:
    """The packed metadata stored beside a version, stamped now (what
    `VersionRecord.from_meta` reads)."""
    return pack_version_meta(
        VersionMeta(
            content_hash=content_hash,
            size=size,
            token=token,
            host=host,
            stored_at=datetime.now(UTC),
            origin=origin,
            source_vm_id=source_vm_id,
            swtpm_version=swtpm_version,
            tpm_profile=None if tpm_profile is None else tpm_profile.name,
            state_format_level=None if tpm_profile is None else tpm_profile.state_format_level,
        )
    )


@dataclass(frozen=True)
class Placement:
    """Where a VM may run, and under which epoch."""

    host: str
    epoch: int

    @classmethod
    def from_reply(cls, host: bytes | None, epoch: bytes | None) -> Placement | None:
        """The placement hash's HMGET host, epoch reply; None when the VM is not placed."""
        return None if host is None or epoch is None else cls(host.decode(), int(epoch))


@dataclass(frozen=True)
class StoredHead:
    """The newest stored version of one VM state: what it holds and under which token."""

    content_hash: str
    token: FencingToken


class StateRepository:
    """Redis access for the state store."""

    def __init__(
        self,
        redis: Redis,
        keys: KeyRing,
        *,
        history_depth: int,
        replicas: ReplicaQuorum = NO_REPLICAS,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._history_depth = history_depth
        self._replicas = replicas
        self._unwrapped: OrderedDict[bytes, DataKey] = OrderedDict()
        scripts = resources.files(__package__)
        self._persist = redis.register_script(scripts.joinpath("persist.lua").read_text())
        self._persist_initial = redis.register_script(
            scripts.joinpath("persist_initial.lua").read_text()
        )
        self.trust = TpmTrust(redis, replicas)
        """Which TPM is each VM's own, and which version restores hand out."""

    @property
    def redis(self) -> Redis:
        """The client, for the store's other Redis views (snapshots, history)."""
        return self._redis

    @property
    def keys(self) -> KeyRing:
        """The key ring, for the store's other readers of data keys (stored versions)."""
        return self._keys

    @property
    def replicas(self) -> ReplicaQuorum:
        """The replicas a write waits for, for the store's other writers (snapshots)."""
        return self._replicas

    async def data_key(self, vm_id: str) -> DataKey:
        """The VM's data key, created on first use."""
        return (await self.data_keys([vm_id]))[vm_id]

    async def data_keys(self, vm_ids: Collection[str]) -> dict[str, DataKey]:
        """The data keys of many VMs, each created on first use: one round trip when they all
        have one already, two when some are new."""
        wanted = list(vm_ids)
        # GETs in a pipeline, not one MGET: each VM's keys are in its own cluster slot.
        pipe = self._redis.pipeline(transaction=False)
        for vm_id in wanted:
            pipe.get(data_key_key(vm_id))
        stored = dict(zip(wanted, await pipe.execute(), strict=True))
        missing = [vm_id for vm_id, raw in stored.items() if raw is None]
        if missing:
            # A boot storm's first versions: every VM at once, in one more round trip.
            stored.update(await self._new_data_keys(missing))
        return {vm_id: self._unwrap(bytes(raw)) for vm_id, raw in stored.items()}

    async def _new_data_keys(self, vm_ids: list[str]) -> dict[str, bytes]:
        """Store a data key for each VM that had none; the stored (wrapped) keys. Two
        replicas racing agree on one key per VM: only the first SET NX wins, and the GET
        after it on the same connection reads back the winner."""
        pipe = self._redis.pipeline(transaction=False)
        for vm_id in vm_ids:
            key = data_key_key(vm_id)
            pipe.set(key, self._keys.wrap(new_data_key()).to_bytes(), nx=True)
            pipe.get(key)
        replies = await pipe.execute()
        stored: dict[str, bytes] = {}
        for vm_id, raw in zip(vm_ids, replies[1::2], strict=True):
            if raw is None:
                raise RuntimeError(f"data key of {vm_id} vanished right after it was written")
            stored[vm_id] = bytes(raw)
        return stored

    def _unwrap(self, stored: bytes) -> DataKey:
        """Unwrap a stored data key, remembering recent ones by their wrapped bytes.

        RFC 3394 unwrapping runs in Python and cost more than the blob's own AES-GCM on
        every persist. Keyed by the wrapped bytes, not by VM: the record is still read from
        Redis each time, so a data key that was deleted and created anew, or rewrapped
        under a new KEK, is a different entry and never served stale."""
        known = self._unwrapped.get(stored)
        if known is not None:
            self._unwrapped.move_to_end(stored)
            return known
        data_key = self._keys.unwrap(WrappedKey.from_bytes(stored))
        self._unwrapped[stored] = data_key
        if len(self._unwrapped) > UNWRAPPED_KEYS_KEPT:
            self._unwrapped.popitem(last=False)
        return data_key

    async def head_hash(self, vm_id: str, kind: StateKind) -> str | None:
        """Hash of the newest stored version, None when nothing is stored."""
        value = await awaited(self._redis.hget(state_head_key(vm_id, kind), "hash"))
        # The client returns bytes (no decode_responses); redis-py's annotation says str.
        return bytes(cast(bytes, value)).decode() if value is not None else None

    async def heads_and_placements(
        self, states: Sequence[tuple[str, StateKind]]
    ) -> list[tuple[StoredHead | None, Placement | None]]:
        """The head (hash and token) and `placement` of each (VM, kind) in one round trip:
        every change a ``state.changed`` announces needs both before it is pulled."""
        pipe = self._redis.pipeline(transaction=False)
        for vm_id, kind in states:
            pipe.hmget(state_head_key(vm_id, kind), ["hash", "epoch", "generation"])
            pipe.hmget(placement_key(vm_id), ["host", "epoch"])
        replies = iter(await pipe.execute())
        found: list[tuple[StoredHead | None, Placement | None]] = []
        for (head_hash, head_epoch, head_generation), (host, epoch) in zip(
            replies, replies, strict=True
        ):
            head = (
                None
                if head_hash is None or head_epoch is None or head_generation is None
                else StoredHead(
                    head_hash.decode(),
                    FencingToken(epoch=int(head_epoch), generation=int(head_generation)),
                )
            )
            found.append((head, Placement.from_reply(host, epoch)))
        return found

    async def placements_and_head_hashes(
        self, vm_ids: list[str]
    ) -> dict[str, tuple[Placement | None, dict[StateKind, str | None]]]:
        """Placement and head hash per kind of many VMs in one round trip: a heartbeat
        lists every VM of its host, and reconciling them one read at a time costs three
        round trips per VM every few seconds."""
        pipe = self._redis.pipeline(transaction=False)
        for vm_id in vm_ids:
            pipe.hmget(placement_key(vm_id), ["host", "epoch"])
            for kind in StateKind:
                pipe.hget(state_head_key(vm_id, kind), "hash")
        replies = iter(await pipe.execute())
        found: dict[str, tuple[Placement | None, dict[StateKind, str | None]]] = {}
        for vm_id in vm_ids:
            placement = Placement.from_reply(*next(replies))
            heads = {}
            for kind in StateKind:
                value = next(replies)
                heads[kind] = value.decode() if value is not None else None
            found[vm_id] = (placement, heads)
        return found

    async def head_version(self, vm_id: str, kind: StateKind) -> int | None:
        """Number of the newest stored version, None when nothing is stored."""
        value = await awaited(self._redis.hget(state_head_key(vm_id, kind), "version"))
        return int(value) if value is not None else None

    async def write_version(self, write: VersionWrite) -> WriteResult:
        """Fenced compare-and-set of a new version (see persist.lua), returned once the
        replicas hold it (NotReplicatedError when they do not in time)."""
        (result,) = await self.write_versions([write])
        if isinstance(result, RedisError):
            raise result
        return result

    async def write_versions(
        self, writes: Sequence[VersionWrite]
    ) -> list[WriteResult | RedisError]:
        """`write_version` of each, in one pipeline with one wait for the replicas: a fetched
        batch costs one Redis round trip and shares one AOF fsync. Each write is fenced on
        its own, and one that Redis failed (a damaged key, say) is that write's result, not
        the batch's. Give at most one write per VM and kind (a retried one may run after
        the rest). Raises NotReplicatedError when the replicas do not hold them in time."""

        async def queue(pipe: Pipeline) -> None:
            for write in writes:
                await self._persist(
                    keys=[
                        placement_key(write.vm_id),
                        state_head_key(write.vm_id, write.kind),
                        state_blobs_key(write.vm_id, write.kind),
                        state_meta_key(write.vm_id, write.kind),
                        state_history_key(write.vm_id, write.kind),
                        state_identities_key(write.vm_id, write.kind),
                        state_identity_trust_key(write.vm_id, write.kind),
                    ],
                    args=[
                        write.host,
                        write.token.epoch,
                        write.token.generation,
                        write.content_hash,
                        write.sealed,
                        version_meta(
                            content_hash=write.content_hash,
                            size=write.size,
                            token=write.token,
                            host=write.host,
                            swtpm_version=write.swtpm_version,
                            tpm_profile=write.tpm_profile,
                        ),
                        self._history_depth,
                        "-" if write.tpm_identity is None else write.tpm_identity,
                    ],
                    client=pipe,
                )

        replies = await run_replicated(self._redis, self._replicas, queue, raise_on_error=False)
        return [
            reply if isinstance(reply, RedisError) else WriteResult.from_reply(reply)
            for reply in replies
        ]

    async def write_initial(
        self,
        vm_id: str,
        versions: dict[StateKind, InitialVersion],
        *,
        origin: VersionOrigin,
        source_vm_id: str,
    ) -> InitialOutcome:
        """Store the first state of a VM that has none, as version 1 of each given kind
        under `INITIAL_TOKEN`, atomically (see persist_initial.lua). No placement check:
        the VM runs nowhere yet. Returned once the replicas hold it."""
        keys: list[str] = []
        args: list[bytes | str | int] = [INITIAL_TOKEN.epoch, INITIAL_TOKEN.generation]
        for kind in StateKind:
            keys += [
                state_head_key(vm_id, kind),
                state_blobs_key(vm_id, kind),
                state_meta_key(vm_id, kind),
                state_history_key(vm_id, kind),
                state_identities_key(vm_id, kind),
                state_identity_trust_key(vm_id, kind),
            ]
            initial = versions.get(kind)
            if initial is None:
                args += ["", "", "", ""]
                continue
            meta = version_meta(
                content_hash=initial.content_hash,
                size=initial.size,
                token=INITIAL_TOKEN,
                host="",
                origin=origin,
                source_vm_id=source_vm_id,
            )
            args += [initial.content_hash, initial.sealed, meta, initial.identity]
        ((outcome,),) = await run_replicated(
            self._redis,
            self._replicas,
            lambda pipe: self._persist_initial(keys=keys, args=args, client=pipe),
        )
        return InitialOutcome(outcome.decode())

    async def has_state(self, vm_id: str) -> bool:
        """True when any kind of the VM has a stored version."""
        pipe = self._redis.pipeline(transaction=False)
        for kind in StateKind:
            pipe.exists(state_head_key(vm_id, kind))
        return any(await pipe.execute())
