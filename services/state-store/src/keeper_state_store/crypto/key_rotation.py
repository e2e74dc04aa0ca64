"""KEK rotation: rewrap every VM's data key with the current key-encryption key.

Only the wrapping changes: blobs stay sealed under the same data keys, so no blob is
touched and no reader notices. Each replica runs it at start (``rewrap_on_start``) while
it holds previous KEKs. It is safe everywhere at once:

- each record is replaced by a compare-and-set on its old value (one Lua script, one key,
  so it works on Redis Cluster too): a record that changed meanwhile is read again, never
  overwritten blindly;
- AES key wrap is deterministic, so two replicas rewrapping one record compute the same
  bytes, and the loser of the race finds the record already current;
- a record already under the current KEK is left alone, so a second run changes nothing;
- a record under a KEK the ring does not hold is reported and left alone.

Readers need no pause: during the rotation every replica holds both KEKs in its `KeyRing`
and unwraps each record with the KEK it names. The order of a rollout is described in
`keeper_state_store.crypto.key_ring`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Final

import structlog
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from keeper_shared.redis_access.keys import data_key_key
from keeper_shared.redis_access.results import awaited
from keeper_state_store.crypto.encryption import DecryptionError, WrappedKey
from keeper_state_store.crypto.key_ring import KeyRing, UnknownKeyError

log = structlog.get_logger(__name__)

_SCAN_COUNT: Final = 1000
_BATCH: Final = 256
_CAS_ATTEMPTS: Final = 3
_DEK_KEY = re.compile(r"^keeper:\{([^{}]+)\}:dek$")

_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""


@dataclass
class RotationReport:
    """What one rotation run found and did."""

    current_kek_id: str
    scanned: int = 0
    rewrapped: int = 0
    already_current: int = 0
    raced: int = 0
    """Records another replica rewrapped between our read and our write."""
    unknown_kek: dict[str, int] = field(default_factory=dict)
    """KEK id -> records wrapped by a KEK this ring does not hold (left as they are)."""
    damaged: list[str] = field(default_factory=list)
    """VM ids whose record is malformed or fails its integrity check (left as they are)."""
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """True when every record found is now wrapped by the current KEK."""
        return not self.unknown_kek and not self.damaged


async def rotate_data_keys(redis: Redis, keys: KeyRing) -> RotationReport:
    """Rewrap every ``keeper:{vm}:dek`` not wrapped by ``keys.current``; idempotent."""
    started = time.monotonic()
    report = RotationReport(current_kek_id=keys.current.key_id)
    compare_and_set = redis.register_script(_COMPARE_AND_SET)
    batch: list[bytes] = []
    async for raw in redis.scan_iter(match=data_key_key("*"), count=_SCAN_COUNT):
        batch.append(bytes(raw))
        if len(batch) >= _BATCH:
            await _rotate_batch(redis, keys, compare_and_set, batch, report)
            batch = []
    if batch:
        await _rotate_batch(redis, keys, compare_and_set, batch, report)
    report.seconds = time.monotonic() - started
    log.info(
        "data keys rotated",
        kek_id=report.current_kek_id,
        scanned=report.scanned,
        rewrapped=report.rewrapped,
        already_current=report.already_current,
        raced=report.raced,
        unknown_kek_ids=sorted(report.unknown_kek),
        damaged=len(report.damaged),
        seconds=round(report.seconds, 3),
    )
    return report


async def _rotate_batch(
    redis: Redis,
    keys: KeyRing,
    compare_and_set: AsyncScript,
    names: list[bytes],
    report: RotationReport,
) -> None:
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.get(name)
    values = await pipe.execute()
    for name, value in zip(names, values, strict=True):
        if value is None:
            continue  # deleted between SCAN and GET (the VM was removed)
        report.scanned += 1
        await _rotate_one(redis, keys, compare_and_set, name, bytes(value), report)


async def _rotate_one(
    redis: Redis,
    keys: KeyRing,
    compare_and_set: AsyncScript,
    name: bytes,
    stored: bytes,
    report: RotationReport,
) -> None:
    match = _DEK_KEY.match(name.decode("utf-8", errors="replace"))
    vm_id = match.group(1) if match else "?"
    raced = False
    for _attempt in range(_CAS_ATTEMPTS):
        try:
            wrapped = WrappedKey.from_bytes(stored)
            if keys.is_current(wrapped):
                if raced:
                    report.raced += 1
                else:
                    report.already_current += 1
                return
            rewrapped = keys.rewrap(wrapped)
        except UnknownKeyError:
            kek_id = WrappedKey.from_bytes(stored).kek_id
            report.unknown_kek[kek_id] = report.unknown_kek.get(kek_id, 0) + 1
            log.warning("data key wrapped by an unknown KEK", vm_id=vm_id, kek_id=kek_id)
            return
        except DecryptionError as error:
            report.damaged.append(vm_id)
            log.error("data key record is damaged", vm_id=vm_id, reason=str(error))
            return
        if await compare_and_set(keys=[name], args=[stored, rewrapped.to_bytes()]):
            report.rewrapped += 1
            return
        # Changed under us (another replica won the race): judge the new value.
        raced = True
        fresh = await awaited(redis.get(name))
        if fresh is None:
            return
        stored = bytes(fresh)
    log.warning("data key kept changing during rotation; left for the next run", vm_id=vm_id)
