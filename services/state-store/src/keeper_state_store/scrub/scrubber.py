"""Background verification of every stored version: a backup is only as good as its restore.

Each store replica runs one `Scrubber`. A pass SCANs the keyspace for the kinds each VM
stores (``keeper:{<vm>}:<kind>:head``) and, of the versions kept (the history, plus those
snapshots pin), reads every one not verified within ``interval_s`` through the restore's
own path (`keeper_state_store.storage.version_reader`): the same copy, decrypted,
decompressed within bounds and checked against the recorded hash the same way. A TPM
version must also unpack as a canonical archive and, where swtpm is installed beside the
store, start in a throwaway swtpm, whose EK public area is then hashed. swtpm does not
notice flipped bytes inside a state, so the hash is what catches corruption; swtpm proves
the state is a usable TPM.

The result of each version goes into ``state_flags_key(vm, kind)`` (see `ScrubFlag`). A
failure is counted, logged (names and reasons only, never bytes) and announced as
``state.scrub.failed``; a TPM version whose EK differs from the previous good version's is
flagged ``ek_changed`` and announced as ``state.tpm.reset`` naming that version, unless the
store read that version's identity when it persisted it (it judged it then, at once; see
`keeper_state_store.storage.tpm_trust`). A version is announced again only when its
verdict changes, not on every pass.

Replicas share the work without a leader: a short per-VM lock (``SET NX PX`` with a random
token, renewed before each version, released by compare-and-delete) keeps two replicas off
one VM at once, and a version verified recently by any replica is skipped by the others.
Versions are verified at no more than ``versions_per_second`` per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.scrub import StateScrubFailed
from keeper_shared.messages.tpm_reset import ResetFoundBy, TpmReset
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import (
    PREFIX,
    scrub_lock_key,
    state_flags_key,
    state_history_key,
    state_identities_key,
    state_meta_key,
    state_pinned_meta_key,
    tpm_secret_key,
)
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.compression import BlobFormatError
from keeper_shared.state_format.tpm_archive import unpack_tpm_state
from keeper_shared.swtpm import SwtpmError
from keeper_state_store.crypto.encryption import DataKey, DecryptionError
from keeper_state_store.crypto.key_ring import KeyRing, UnknownKeyError
from keeper_state_store.crypto.tpm_secrets import open_tpm_secret
from keeper_state_store.scrub.flags import ScrubFlag
from keeper_state_store.scrub.tpm_probe import (
    ek_readable,
    probe_tpm_state,
    reap_stale_probes,
    swtpm_available,
)
from keeper_state_store.storage.version_reader import (
    StoredVersion,
    VersionReader,
    VersionUnreadableError,
)

log = structlog.get_logger(__name__)

_HEAD_KEY = re.compile(
    rf"^{PREFIX}:\{{([0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}})\}}:"
    r"(tpm|nvram):head$"
)
_SCAN_COUNT: Final = 1000
_MAX_REASON: Final = 480
_SWTPM_ATTEMPTS: Final = 2

_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class EventPublisher(Protocol):
    """Publishes an event about ``subject`` (``BusClient.publish_event`` fits)."""

    async def __call__(self, payload: Payload, *, subject: str) -> object: ...


class VmScrubOutcome(enum.StrEnum):
    """What `Scrubber.scrub_vm` did with a VM."""

    SCRUBBED = "scrubbed"
    """This replica held the VM's lock and looked at every kept version."""
    BUSY = "busy"
    """Another replica is scrubbing the VM right now."""
    UNREADABLE = "unreadable"
    """The data key is wrapped by a KEK this replica does not hold: nothing was judged."""
    INTERRUPTED = "interrupted"
    """Stopped early (shutdown, or the lock was lost to another replica)."""


@dataclass(frozen=True)
class VmScrubReport:
    """One VM's scrub, for callers and tests."""

    vm_id: str
    outcome: VmScrubOutcome
    verified: int = 0
    failed: int = 0
    ek_changed: int = 0
    fresh: int = 0


@dataclass
class PassSummary:
    """What one pass did (counts only: a pass may cover millions of VMs)."""

    vms: int = 0
    busy: int = 0
    verified: int = 0
    failed: int = 0
    ek_changed: int = 0
    fresh: int = 0

    def add(self, report: VmScrubReport) -> None:
        """Count one VM's report in."""
        self.vms += 1
        self.busy += report.outcome is VmScrubOutcome.BUSY
        self.verified += report.verified
        self.failed += report.failed
        self.ek_changed += report.ek_changed
        self.fresh += report.fresh


@dataclass
class ScrubStats:
    """Counters since the scrubber was made (for metrics)."""

    passes: int = 0
    vms_scrubbed: int = 0
    vms_busy: int = 0
    vms_unreadable: int = 0
    versions_verified: int = 0
    versions_fresh: int = 0
    failures: int = 0
    """Verifications that failed (a corrupt version counts once per verification)."""
    ek_changes: int = 0
    announced: int = 0
    swtpm_loads: int = 0
    swtpm_seconds: float = 0.0


@dataclass(frozen=True)
class _Verdict:
    ok: bool
    reason: str | None = None
    ek_sha256: str | None = None
    swtpm_loaded: bool = False


class _VerificationFailed(Exception):
    """One version failed; the text is a reason fit for flags, events and logs."""


class _LockLost(Exception):
    """The VM's lock expired and may be held by another replica now."""


class _DataKeyCache:
    """A VM's data key (or why it cannot be had), read at most once per scrub."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: DataKey | VersionUnreadableError | None = None


class _RateLimiter:
    """At most ``per_second`` calls to `wait` return per second, without bursts."""

    def __init__(self, per_second: float) -> None:
        self._period = 1.0 / per_second
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        start = max(self._next, now)
        self._next = start + self._period
        if start > now:
            await asyncio.sleep(start - now)


def _reason(prefix: str, error: BaseException | str) -> str:
    return f"{prefix}: {error}"[:_MAX_REASON]


class Scrubber:
    """Verifies stored versions in the background; one per store replica."""

    def __init__(
        self,
        redis: Redis,
        keys: KeyRing,
        publish: EventPublisher,
        *,
        versions_per_second: float = 5.0,
        interval_s: float = 86400.0,
        pass_pause_s: float = 60.0,
        use_swtpm: bool = True,
        temp_dir: Path | None = None,
        lock_ttl_s: float = 60.0,
    ) -> None:
        """``interval_s``: a version verified more recently than this (by any replica) is
        skipped; ``pass_pause_s``: the pause between two passes; ``use_swtpm``: load TPM
        versions into swtpm when it is installed; ``temp_dir``: where throwaway swtpm
        state goes (the system's temporary directory when None)."""
        if versions_per_second <= 0:
            raise ValueError("versions_per_second must be positive")
        self._redis = redis
        self._reader = VersionReader(redis, keys)
        self._publish = publish
        self._interval = timedelta(seconds=interval_s)
        self._pass_pause_s = pass_pause_s
        self._use_swtpm = use_swtpm and swtpm_available()
        self._read_ek = self._use_swtpm and ek_readable()
        self._temp_dir = temp_dir
        self._lock_ttl_ms = int(lock_ttl_s * 1000)
        self._limiter = _RateLimiter(versions_per_second)
        self._renew_lock = redis.register_script(_RENEW_LOCK)
        self._release_lock = redis.register_script(_RELEASE_LOCK)
        self._stop = asyncio.Event()
        self.stats = ScrubStats()

    @property
    def failures(self) -> int:
        """Failed verifications so far (the metric)."""
        return self.stats.failures

    @property
    def uses_swtpm(self) -> bool:
        """Whether TPM versions are loaded into a throwaway swtpm."""
        return self._use_swtpm

    async def run(self, stop: asyncio.Event) -> None:
        """Scrub pass after pass until ``stop`` is set; errors are logged, not raised."""
        self._stop = stop
        log.info(
            "scrubber started",
            swtpm=self._use_swtpm,
            ek=self._read_ek,
            interval_s=self._interval.total_seconds(),
        )
        while not stop.is_set():
            started = time.monotonic()
            try:
                summary = await self.run_pass()
            except Exception as error:  # the scrubber outlives a bad pass; the next one retries
                # Only texts known to be free of data are logged; others by their type.
                safe = isinstance(error, (RedisError, OSError))
                log.warning(
                    "scrub pass failed",
                    error_type=type(error).__name__,
                    error=str(error) if safe else None,
                )
            else:
                log.info(
                    "scrub pass done",
                    vms=summary.vms,
                    busy=summary.busy,
                    verified=summary.verified,
                    failed=summary.failed,
                    ek_changed=summary.ek_changed,
                    seconds=round(time.monotonic() - started, 3),
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._pass_pause_s):
                    await stop.wait()

    async def run_pass(self) -> PassSummary:
        """One pass over every VM and kind with stored versions."""
        summary = PassSummary()
        if self._use_swtpm:
            reaped = await asyncio.to_thread(reap_stale_probes, self._temp_dir)
            if reaped:
                log.warning("removed probes left by a killed scrubber", directories=reaped)
        async for vm_id, kind in self._stored_kinds():
            if self._stop.is_set():
                break
            summary.add(await self.scrub_vm(vm_id, (kind,)))
        self.stats.passes += 1
        return summary

    async def _stored_kinds(self) -> AsyncIterator[tuple[str, StateKind]]:
        # Every kind with kept versions has a head, whatever else of it Redis lost.
        pattern = f"{PREFIX}:{{*}}:*:head"
        async for raw in self._redis.scan_iter(match=pattern, count=_SCAN_COUNT):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            match = _HEAD_KEY.match(key)
            if match is not None:
                yield match.group(1), StateKind(match.group(2))

    async def scrub_vm(
        self, vm_id: str, kinds: Sequence[StateKind] = tuple(StateKind)
    ) -> VmScrubReport:
        """Verify the VM's kept versions of ``kinds`` that are due, under the VM's lock."""
        lock = scrub_lock_key(vm_id)
        token = secrets.token_hex(16)
        if not await awaited(self._redis.set(lock, token, nx=True, px=self._lock_ttl_ms)):
            self.stats.vms_busy += 1
            return VmScrubReport(vm_id, VmScrubOutcome.BUSY)
        counts = {"verified": 0, "failed": 0, "ek_changed": 0, "fresh": 0}
        outcome = VmScrubOutcome.SCRUBBED
        try:
            dek = _DataKeyCache()
            for kind in kinds:
                await self._scrub_kind(vm_id, kind, token, dek, counts)
        except UnknownKeyError as error:
            self.stats.vms_unreadable += 1
            log.warning("scrub skipped: data key not readable here", vm_id=vm_id, reason=str(error))
            outcome = VmScrubOutcome.UNREADABLE
        except _LockLost:
            log.warning("scrub lock lost", vm_id=vm_id)
            outcome = VmScrubOutcome.INTERRUPTED
        finally:
            with contextlib.suppress(RedisError):
                await self._release_lock(keys=[lock], args=[token])
        if outcome is VmScrubOutcome.SCRUBBED:
            if self._stop.is_set():
                outcome = VmScrubOutcome.INTERRUPTED
            else:
                self.stats.vms_scrubbed += 1
        return VmScrubReport(vm_id, outcome, **counts)

    async def _data_key(self, vm_id: str, cache: _DataKeyCache) -> DataKey:
        """The VM's data key, read once per scrub (`UnknownKeyError` passes through)."""
        if cache.value is None:
            try:
                cache.value = await self._reader.data_key(vm_id)
            except VersionUnreadableError as missing:
                cache.value = missing
        found = cache.value
        if isinstance(found, VersionUnreadableError):
            raise found
        return found

    async def _scrub_kind(
        self,
        vm_id: str,
        kind: StateKind,
        token: str,
        dek: _DataKeyCache,
        counts: dict[str, int],
    ) -> None:
        flags_key = state_flags_key(vm_id, kind)
        pipe = self._redis.pipeline(transaction=False)
        pipe.lrange(state_history_key(vm_id, kind), 0, -1)
        pipe.hkeys(state_meta_key(vm_id, kind))
        pipe.hkeys(state_pinned_meta_key(vm_id, kind))
        pipe.hgetall(flags_key)
        in_history, with_meta, pinned, raw_flags = await pipe.execute()
        # Kept: the last N of the history, and whatever a snapshot pins beyond them. The
        # history list names them even when a version's metadata is lost, which a restore
        # would then report, so the scrubber must judge that version too.
        kept_fields = [*in_history, *with_meta, *pinned]
        versions = sorted({int(v) for v in kept_fields if bytes(v).isdigit()})
        flags: dict[int, ScrubFlag | None] = {
            int(field): ScrubFlag.from_json(value)
            for field, value in raw_flags.items()
            if bytes(field).isdigit()
        }
        kept = set(versions)
        stale = [str(v) for v in flags if v not in kept]
        if stale:
            # Versions neither the history nor a snapshot keeps any more.
            await awaited(self._redis.hdel(flags_key, *stale))
        previous_good: tuple[int, str] | None = None
        for version in versions:
            if self._stop.is_set():
                return
            existing = flags.get(version)
            stored = await self._reader.fetch(vm_id, kind, version)
            if stored is None:
                continue  # dropped meanwhile
            record = stored.record()
            recorded_hash = record.content_hash if record is not None else None
            if (
                existing is not None
                and existing.content_hash == recorded_hash
                and datetime.now(UTC) - existing.scrubbed_at < self._interval
            ):
                counts["fresh"] += 1
                self.stats.versions_fresh += 1
                if existing.ok and existing.ek_sha256 is not None:
                    previous_good = (version, existing.ek_sha256)
                continue
            await self._limiter.wait()
            if not await self._renew_lock(
                keys=[scrub_lock_key(vm_id)], args=[token, self._lock_ttl_ms]
            ):
                raise _LockLost
            verdict = await self._verify(stored, dek)
            flag = ScrubFlag(
                scrubbed_at=datetime.now(UTC),
                ok=verdict.ok,
                reason=verdict.reason,
                content_hash=recorded_hash,
                ek_sha256=verdict.ek_sha256,
                swtpm_loaded=verdict.swtpm_loaded,
            )
            if (
                verdict.ok
                and verdict.ek_sha256 is not None
                and previous_good is not None
                and previous_good[1] != verdict.ek_sha256
            ):
                flag = ScrubFlag(
                    scrubbed_at=flag.scrubbed_at,
                    ok=True,
                    reason=f"endorsement key changed since version {previous_good[0]}",
                    content_hash=recorded_hash,
                    ek_sha256=verdict.ek_sha256,
                    swtpm_loaded=verdict.swtpm_loaded,
                    ek_changed=True,
                    previous_good_version=previous_good[0],
                )
            counts["verified"] += 1
            self.stats.versions_verified += 1
            await self._record(vm_id, kind, version, flag, existing, previous_good, counts)
            if flag.ok and flag.ek_sha256 is not None:
                previous_good = (version, flag.ek_sha256)

    async def _record(
        self,
        vm_id: str,
        kind: StateKind,
        version: int,
        flag: ScrubFlag,
        existing: ScrubFlag | None,
        previous_good: tuple[int, str] | None,
        counts: dict[str, int],
    ) -> None:
        """Count, log and announce what changed, then store the flag.

        Announcing before storing means a crash in between announces again next time
        (at least once) instead of never."""
        same_version = existing is not None and existing.content_hash == flag.content_hash
        if not flag.ok:
            counts["failed"] += 1
            self.stats.failures += 1
            log.warning(
                "stored version failed verification",
                vm_id=vm_id,
                kind=kind.value,
                version=version,
                reason=flag.reason,
            )
            if not (same_version and existing is not None and not existing.ok):
                await self._publish(
                    StateScrubFailed(
                        vm_id=vm_id, kind=kind, version=version, reason=flag.reason or "failed"
                    ),
                    subject=vm_id,
                )
                self.stats.announced += 1
        elif flag.ek_changed:
            assert previous_good is not None
            assert flag.ek_sha256 is not None
            counts["ek_changed"] += 1
            self.stats.ek_changes += 1
            log.warning(
                "TPM endorsement key changed",
                vm_id=vm_id,
                version=version,
                previous_good_version=previous_good[0],
            )
            repeated = (
                same_version
                and existing is not None
                and existing.ek_changed
                and existing.previous_good_version == previous_good[0]
            )
            # A version whose identity the store read when it persisted it was judged then
            # (and flagged at once if it was another TPM; an accepted or restored one is
            # the VM's own): announcing it again would flag what someone already settled.
            judged = await awaited(
                self._redis.hexists(state_identities_key(vm_id, kind), str(version))
            )
            if not repeated and not judged:
                await self._publish(
                    TpmReset(
                        vm_id=vm_id,
                        version=version,
                        previous_good_version=previous_good[0],
                        found_by=ResetFoundBy.SCRUB,
                        ek_sha256=flag.ek_sha256,
                        previous_ek_sha256=previous_good[1],
                    ),
                    subject=vm_id,
                )
                self.stats.announced += 1
        await awaited(self._redis.hset(state_flags_key(vm_id, kind), str(version), flag.to_json()))

    async def _verify(self, stored: StoredVersion, dek: _DataKeyCache) -> _Verdict:
        try:
            data_key = await self._data_key(stored.vm_id, dek)
            verified = await self._reader.open(stored, data_key)
            verdict = (
                await self._verify_tpm(stored.vm_id, verified.content, data_key)
                if stored.kind is StateKind.TPM
                else _Verdict(ok=True)
            )
        except (VersionUnreadableError, _VerificationFailed) as failure:
            return _Verdict(ok=False, reason=str(failure)[:_MAX_REASON])
        if verdict.ok and verified.history_fault is not None:
            # Restorable (a restore reads the pinned copy too), but the history's copy is
            # damaged: worth a note in the flag, not an alarm.
            note = _reason(
                "verified from the pinned copy; the history copy", verified.history_fault
            )
            return replace(verdict, reason=note)
        return verdict

    async def _verify_tpm(self, vm_id: str, content: bytes, data_key: DataKey) -> _Verdict:
        """What a TPM version must pass beyond its hash: it unpacks, and swtpm loads it."""
        try:
            files = unpack_tpm_state(content)
        except BlobFormatError as error:
            raise _VerificationFailed(_reason("not a valid TPM archive", error)) from None
        if not self._use_swtpm:
            return _Verdict(ok=True)
        return await self._load_in_swtpm(files, await self._tpm_passphrase(vm_id, data_key))

    async def _tpm_passphrase(self, vm_id: str, data_key: DataKey) -> bytes | None:
        """The value of the libvirt secret the VM's TPM state is encrypted with (None for a
        plain state): swtpm cannot load an encrypted state without it."""
        stored = await awaited(self._redis.get(tpm_secret_key(vm_id)))
        if stored is None:
            return None
        try:
            secret = open_tpm_secret(vm_id, bytes(stored), data_key)
        except (DecryptionError, ValueError, KeyError) as error:
            raise _VerificationFailed(_reason("the VM's TPM secret does not open", error)) from None
        return secret.value.get_secret_value()

    async def _load_in_swtpm(self, files: dict[str, bytes], passphrase: bytes | None) -> _Verdict:
        last: SwtpmError | None = None
        for _attempt in range(_SWTPM_ATTEMPTS):
            started = time.monotonic()
            try:
                probe = await probe_tpm_state(
                    files, temp_dir=self._temp_dir, read_ek=self._read_ek, passphrase=passphrase
                )
            except SwtpmError as error:
                # A second attempt tells a state swtpm refuses from a passing hiccup
                # (a port taken between pick and bind, a slow machine).
                last = error
                continue
            finally:
                self.stats.swtpm_loads += 1
                self.stats.swtpm_seconds += time.monotonic() - started
            return _Verdict(ok=True, ek_sha256=probe.ek_sha256, swtpm_loaded=True)
        assert last is not None
        return _Verdict(ok=False, reason=_reason("swtpm could not load the state", last))
