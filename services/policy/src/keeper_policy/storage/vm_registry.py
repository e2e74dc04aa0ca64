"""Policy's records of VMs in Redis: the registered spec, the placement (host and epoch),
the newest persisted versions, the swtpm that last ran the VM, and loss marks.

The placement hash is also what the store's fencing script reads, so raising the epoch here
is what fences a host the VM has left. Every change of a placement is a compare-and-set
script (see ``lua/``), so concurrent replicas cannot both move a VM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError
from redis.asyncio import Redis

from keeper_policy.storage.keys import EPOCH_PENDING, host_vms_key, migration_key
from keeper_policy.storage.scripts import PolicyScripts
from keeper_policy.storage.vm_names import VmNames
from keeper_shared.libtpms import StateProfile
from keeper_shared.messages.placement import RecoveryPoint
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import placement_key, vm_record_key
from keeper_shared.redis_access.results import awaited


class UnknownVmError(LookupError):
    """The VM was never registered through ``tpm.enable``."""


class PlacementConflictError(RuntimeError):
    """The placement changed under us (another replica placed or stopped the VM)."""


@dataclass(frozen=True)
class Placement:
    """Where a VM runs, as the store's fencing sees it."""

    host: str | None
    epoch: int
    placed_at: float | None = None
    epoch_pending: bool = False
    """Moved by a migration; the destination has not confirmed the new epoch yet."""


@dataclass(frozen=True)
class LostMark:
    """A VM's loss mark: the lost host it was on, and its recovery point then (JSON)."""

    host: str | None
    recovery_point: str | None


@dataclass(frozen=True)
class VmRecord:
    """A registered VM."""

    spec: VmSpec
    tpm_xml: str
    host: str | None
    epoch: int
    last_persisted_at: float | None
    versions: dict[StateKind, int] = field(default_factory=dict)
    swtpm_version: str | None = None
    """swtpm version of the host the VM was last placed on (its state's writer)."""
    last_host: str | None = None
    """The host it was last placed on."""
    lost_from: str | None = None
    """Set while the VM's host is declared lost and it was not placed elsewhere yet."""
    adopted_on: str | None = None
    """The host it was adopted on, when vTPM Keeper adopted it rather than defined it: its
    domain belongs to its manager and is never undefined by a stop."""
    placement: Placement = field(default_factory=lambda: Placement(None, 0))
    domain_xml: str | None = None
    """The domain its manager handed over (checked and completed, no epoch), defined at
    each start; None: policy's template from the spec."""
    state_profile: StateProfile | None = None
    """The libtpms profile of its newest TPM state whose profile the store could read."""

    def recovery_point(self, at: float) -> RecoveryPoint:
        """What the VM would restart from, seen at ``at``."""
        persisted = self.last_persisted_at
        return RecoveryPoint(
            vm_id=self.spec.vm_id,
            epoch=self.epoch,
            versions=dict(self.versions),
            last_persisted_at=datetime.fromtimestamp(persisted, UTC) if persisted else None,
            age_s=max(0.0, at - persisted) if persisted else None,
        )


def _text(value: bytes | None) -> str | None:
    return value.decode() if value else None


def _profile(record: dict[bytes, bytes]) -> StateProfile | None:
    name, level = record.get(b"tpm_profile"), record.get(b"state_format_level")
    if name is None or level is None:
        return None
    return StateProfile(name.decode(), int(level))


def parse_placement(raw: dict[bytes, bytes]) -> Placement:
    """A placement hash as read from Redis."""
    placed_at = raw.get(b"placed_at")
    return Placement(
        host=_text(raw.get(b"host")),
        epoch=int(raw.get(b"epoch", 0)),
        placed_at=float(placed_at) if placed_at else None,
        epoch_pending=raw.get(b"epoch_pending") == b"1",
    )


class PolicyRegistry:
    """Redis access for VM records and placements."""

    def __init__(self, redis: Redis, scripts: PolicyScripts) -> None:
        self._redis = redis
        self._scripts = scripts
        self.names = VmNames(redis, scripts)
        """Claims on domain names (an approval claims one before it registers)."""

    @property
    def redis(self) -> Redis:
        """The client, for policy's read-only views (:mod:`keeper_policy.views`)."""
        return self._redis

    async def register_vm(self, spec: VmSpec, tpm_xml: str) -> None:
        """Record an approved VM (idempotent; a new approval replaces spec and element, and
        forgets a stranded-TPM mark: the operator has dealt with it). Its name is claimed
        beside any other holder (an approval that refuses duplicates claimed it first); a
        renamed VM gives its old name up."""
        previous = await self.registered_name(spec.vm_id)
        await self.names.claim(spec.name, spec.vm_id, exclusive=False)
        # A block: a Redis Cluster transaction hands its connection back only on reset.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                vm_record_key(spec.vm_id),
                mapping={"spec": spec.model_dump_json(), "tpm_xml": tpm_xml},
            )
            pipe.hdel(vm_record_key(spec.vm_id), "tpm_stranded")
            await pipe.execute()
        if previous is not None and previous != spec.name:
            await self.names.release(previous, spec.vm_id)

    async def registered_name(self, vm_id: str) -> str | None:
        """The domain name the VM is registered under; None when it is not registered (or
        under a spec this release cannot read)."""
        raw = await awaited(self._redis.hget(vm_record_key(vm_id), "spec"))
        if raw is None:
            return None
        try:
            return VmSpec.model_validate_json(raw).name
        except ValidationError:
            return None

    async def mark_adopted(self, vm_id: str, host: str) -> None:
        """Record that the VM was adopted on ``host`` (its domain is its manager's)."""
        await awaited(self._redis.hset(vm_record_key(vm_id), "adopted_on", host))

    async def is_adopted(self, vm_id: str) -> bool:
        """Whether the VM was adopted rather than defined by vTPM Keeper."""
        return bool(await awaited(self._redis.hexists(vm_record_key(vm_id), "adopted_on")))

    async def placement(self, vm_id: str) -> Placement:
        """The VM's placement (host None when it runs nowhere)."""
        return parse_placement(await awaited(self._redis.hgetall(placement_key(vm_id))))

    async def vm(self, vm_id: str) -> VmRecord:
        """A registered VM with its placement; UnknownVmError if never registered."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(vm_record_key(vm_id))
        pipe.hgetall(placement_key(vm_id))
        record, raw_placement = await pipe.execute()
        if not record:
            raise UnknownVmError(f"VM {vm_id} is not registered (enable its TPM first)")
        placement = parse_placement(raw_placement)
        persisted = record.get(b"last_persisted_at")
        versions = {
            kind: int(record[f"{kind.value}_version".encode()])
            for kind in StateKind
            if f"{kind.value}_version".encode() in record
        }
        return VmRecord(
            spec=VmSpec.model_validate_json(record[b"spec"]),
            tpm_xml=record[b"tpm_xml"].decode(),
            host=placement.host,
            epoch=placement.epoch,
            last_persisted_at=float(persisted) if persisted else None,
            versions=versions,
            swtpm_version=_text(record.get(b"swtpm_version")),
            last_host=_text(record.get(b"last_host")),
            lost_from=_text(record.get(b"lost_from")),
            adopted_on=_text(record.get(b"adopted_on")),
            placement=placement,
            domain_xml=_text(record.get(b"domain_xml")),
            state_profile=_profile(record),
        )

    async def place(self, vm_id: str, host: str, *, expected_host: str | None) -> int:
        """Raise the VM's epoch and set its host, if it is still on ``expected_host``;
        returns the new epoch. PlacementConflictError when it moved meanwhile."""
        outcome, detail = await self._scripts.place(
            keys=[placement_key(vm_id)], args=[expected_host or "", host, time.time()]
        )
        if outcome != b"placed":
            raise PlacementConflictError(
                f"VM {vm_id} is now placed on {detail.decode() or 'no host'}, not "
                f"{expected_host or 'no host'}"
            )
        await self._index(vm_id, old=expected_host, new=host)
        return int(detail)

    async def unplace(self, vm_id: str, host: str) -> bool:
        """The VM runs nowhere, if it was on ``host``: no host may write its state until it
        is placed again. False when it is placed on another host now."""
        cleared = bool(await self._scripts.unplace(keys=[placement_key(vm_id)], args=[host]))
        if cleared:
            await self._index(vm_id, old=host, new=None)
        return cleared

    async def undo_place(self, vm_id: str, host: str, before: LostMark) -> bool:
        """Take back a placement on ``host`` whose start never reached it: the VM runs
        nowhere, and a loss recorded on ``host`` meanwhile gives way to the mark ``before``
        the placement (see ``lua/place_undo.lua``). False when it is placed on another host."""
        cleared = bool(
            await self._scripts.place_undo(
                keys=[placement_key(vm_id), vm_record_key(vm_id)],
                args=[host, before.host or "", before.recovery_point or ""],
            )
        )
        if cleared:
            await self._index(vm_id, old=host, new=None)
        return cleared

    async def lost_mark(self, vm_id: str) -> LostMark:
        """The VM's loss mark as it is now (to be put back by :meth:`undo_place`)."""
        host, point = await awaited(
            self._redis.hmget(vm_record_key(vm_id), ["lost_from", "recovery_point"])
        )
        return LostMark(_text(host), _text(point))

    async def migrate_half(
        self, vm_id: str, role: str, host: str, window_s: float
    ) -> tuple[str, list[str]]:
        """Record one half of a migration (see ``lua/migrate.lua``)."""
        reply = await self._scripts.migrate(
            keys=[placement_key(vm_id), migration_key(vm_id)],
            args=[role, host, int(window_s * 1000), time.time()],
        )
        outcome, *rest = [part.decode() for part in reply]
        if outcome == "moved":
            await self._index(vm_id, old=rest[1], new=rest[2])
            await awaited(self._redis.sadd(EPOCH_PENDING, vm_id))
        return outcome, rest

    async def mark_epoch_pending(self, vm_id: str, host: str, epoch: int) -> None:
        """The domain on ``host`` still runs under an older epoch than its placement's
        ``epoch`` (adopted, not started by us): heartbeats repeat the epoch until it is taken
        (see ``placement.migration``)."""
        placement = await self.placement(vm_id)
        if placement.host == host and placement.epoch == epoch:
            await awaited(self._redis.hset(placement_key(vm_id), "epoch_pending", "1"))
            await awaited(self._redis.sadd(EPOCH_PENDING, vm_id))

    async def epoch_pending(self) -> set[str]:
        """VMs whose destination has not confirmed its new epoch (may hold settled ones)."""
        return {m.decode() for m in await awaited(self._redis.smembers(EPOCH_PENDING))}

    async def confirm_epoch(self, vm_id: str, host: str, epoch: int) -> None:
        """The host reports the VM under its current epoch: nothing is pending any more
        (also forgets VMs whose pending epoch was settled otherwise, by a stop or a place)."""
        placement = await self.placement(vm_id)
        if placement.epoch_pending and placement.host == host and placement.epoch == epoch:
            await awaited(self._redis.hdel(placement_key(vm_id), "epoch_pending"))
            placement = await self.placement(vm_id)
        if not placement.epoch_pending:
            await awaited(self._redis.srem(EPOCH_PENDING, vm_id))

    async def _index(self, vm_id: str, *, old: str | None, new: str | None) -> None:
        # A hint only (the placement hash is the truth), kept per host to find a lost
        # host's VMs without scanning every placement.
        pipe = self._redis.pipeline(transaction=False)
        if old:
            pipe.srem(host_vms_key(old), vm_id)
        if new:
            pipe.sadd(host_vms_key(new), vm_id)
        await pipe.execute()

    async def vms_on(self, host: str) -> list[str]:
        """VMs whose placement is ``host`` (index members re-checked against placements)."""
        members = sorted(
            m.decode() for m in await awaited(self._redis.smembers(host_vms_key(host)))
        )
        placed = []
        for vm_id in members:
            if (await self.placement(vm_id)).host == host:
                placed.append(vm_id)
        return placed

    async def note_placed(
        self, vm_id: str, host: str, swtpm_version: str | None, domain_xml: str | None = None
    ) -> None:
        """The VM started on ``host``: its state is now written by that host's swtpm, any
        loss mark is over, and ``domain_xml`` (when its manager handed one over) is the
        definition its later starts use."""
        key = vm_record_key(vm_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "last_host", host)
            if swtpm_version is not None:
                pipe.hset(key, "swtpm_version", swtpm_version)
            if domain_xml is not None:
                pipe.hset(key, "domain_xml", domain_xml)
            pipe.hdel(key, "lost_from", "recovery_point")
            await pipe.execute()

    async def forget(self, vm_id: str) -> str | None:
        """Remove the VM's registration; None when done, else the host it was placed on
        meanwhile (then nothing changed)."""
        name = await self.registered_name(vm_id)
        host = await self._scripts.forget(keys=[vm_record_key(vm_id), placement_key(vm_id)])
        placed_on = host.decode() or None
        if placed_on is None and name is not None:
            await self.names.release(name, vm_id)
        return placed_on

    async def forget_versions(self, vm_id: str) -> None:
        """The store deleted the VM's state: no persisted version is known any more."""
        await self._scripts.versions_forget(
            keys=[vm_record_key(vm_id)], args=[kind.value for kind in StateKind]
        )

    async def mark_stranded(self, vm_id: str, host: str, reason: str) -> bool:
        """Record that the VM's TPM state cannot be used off ``host`` (its secret is
        unreadable there); False when the VM is not registered."""
        key = vm_record_key(vm_id)
        if not await awaited(self._redis.exists(key)):
            return False
        await awaited(self._redis.hset(key, "tpm_stranded", f"on {host}: {reason}"))
        return True

    async def flag_tpm_reset(self, vm_id: str, version: int, text: str) -> bool:
        """Record that the VM's TPM was replaced unasked from ``version`` on (status shows
        ``text``); False when the VM is not registered or an end covers it already."""
        changed = await self._scripts.tpm_reset(
            keys=[vm_record_key(vm_id)], args=["flag", version, text]
        )
        return bool(changed)

    async def clear_tpm_reset(self, vm_id: str, version: int) -> bool:
        """Every TPM reset of the VM up to ``version`` is over; True when one was flagged."""
        changed = await self._scripts.tpm_reset(
            keys=[vm_record_key(vm_id)], args=["clear", version]
        )
        return bool(changed)

    async def mark_lost(self, vm_id: str, host: str, point: RecoveryPoint) -> bool:
        """Record that the VM's host was declared lost, with its recovery point, if it is
        still placed there; False when it is not (its placement was undone or moved)."""
        marked = await self._scripts.mark_lost(
            keys=[vm_record_key(vm_id), placement_key(vm_id)],
            args=[host, point.model_dump_json()],
        )
        return bool(marked)

    async def note_persisted(
        self,
        vm_id: str,
        kind: StateKind,
        version: int,
        at: float,
        profile: StateProfile | None = None,
    ) -> None:
        """Remember the newest persisted version of ``kind`` and when (the recovery point),
        and a TPM version's libtpms profile when the store could read it."""
        await self._scripts.persisted(
            keys=[vm_record_key(vm_id)],
            args=[
                kind.value,
                version,
                at,
                "" if profile is None else profile.name,
                "" if profile is None else profile.state_format_level,
            ],
        )
