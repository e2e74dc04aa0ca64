"""The scrubber against a real Redis and real swtpm: corruption made on purpose is found.

Versions are written the way the store writes them (data key from the repository, AES-GCM
bound to VM, kind and token, fenced write), from real TPM states manufactured by
swtpm_setup, so each has an endorsement key. Then Redis is damaged directly: a flipped
byte in a sealed blob, and a version whose plaintext does not hash to the recorded hash.
The scrubber must flag exactly those, announce them once, see a TPM manufactured again
(new EK) as a reset naming the version to restore, and leave no swtpm or directory behind.

The tests use a Redis database of their own on the session's server (flushed around each
test), so a pass sees only the VMs made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from redis.asyncio import Redis

from keeper_devtools.swtpm_lab import DEMO_NV_INDEX, manufacture_tpm_state, nv_write_secret
from keeper_shared.bus.client import Delivery
from keeper_shared.messages.endorsement import EndorsementKeyRead, ReadEndorsementKey
from keeper_shared.messages.envelope import new_envelope
from keeper_shared.messages.scrub import StateScrubFailed, TpmReset
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import (
    data_key_key,
    placement_key,
    scrub_lock_key,
    state_blobs_key,
    state_flags_key,
    state_meta_key,
    state_pinned_blobs_key,
    state_pinned_meta_key,
    tpm_secret_key,
)
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.blobs import content_hash
from keeper_shared.state_format.compression import compress
from keeper_shared.state_format.tpm_archive import (
    pack_tpm_state,
    read_tpm_state_dir,
    unpack_tpm_state,
)
from keeper_shared.swtpm import PERMALL_NAME, start_swtpm
from keeper_state_store.crypto.encryption import (
    KeyEncryptionKey,
    blob_associated_data,
    encrypt_blob,
    new_data_key,
    wrap_data_key,
)
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.crypto.tpm_secrets import TpmSecretVault
from keeper_state_store.handlers.endorsement import EndorsementKeys
from keeper_state_store.scrub.flags import ScrubFlag
from keeper_state_store.scrub.scrubber import Scrubber, VmScrubOutcome
from keeper_state_store.scrub.tpm_probe import probe_tpm_state, reap_stale_probes
from keeper_state_store.storage.repository import StateRepository, VersionWrite, WriteOutcome
from support.leak_scan import leak_forms
from support.recording_publisher import RecordingPublisher
from support.redis_db import PrivateDatabase

pytestmark = [
    pytest.mark.redis,
    pytest.mark.swtpm,
    pytest.mark.usefixtures("swtpm_tools", "no_swtpm_left"),
]

CANARY = b"SCRUBBER-CANARY-" + os.urandom(16)


@pytest.fixture
def scrub_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the scrubber's throwaway swtpm state goes; it must be empty afterwards."""
    directory = tmp_path / "scrub"
    directory.mkdir()
    yield directory
    assert list(directory.iterdir()) == [], "the scrubber left a directory behind"


# --- TPM states: two manufactured TPMs (two EKs), each before and after a seal ----------


async def _tpm_archives(root: Path, ca_config: Path) -> tuple[bytes, bytes]:
    """A newly manufactured TPM's canonical archive, and the same TPM after a seal."""
    state_dir = root / "tpm2"
    await manufacture_tpm_state(state_dir, config=ca_config)
    fresh = pack_tpm_state(read_tpm_state_dir(state_dir))
    async with await start_swtpm(state_dir) as tpm:
        await nv_write_secret(tpm.tcti, DEMO_NV_INDEX, os.urandom(32))
    sealed = pack_tpm_state(read_tpm_state_dir(state_dir))
    return fresh, sealed


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tpm_states(tmp_path_factory: pytest.TempPathFactory, ca_config: Path) -> dict[str, bytes]:
    """``a1``, ``a2``: one TPM before and after a seal (same EK); ``b1``, ``b2``: a TPM
    manufactured again (a new EK), before and after a seal."""
    a1, a2 = await _tpm_archives(tmp_path_factory.mktemp("tpm-a"), ca_config)
    b1, b2 = await _tpm_archives(tmp_path_factory.mktemp("tpm-b"), ca_config)
    assert len({a1, a2, b1, b2}) == 4
    return {"a1": a1, "a2": a2, "b1": b1, "b2": b2}


# --- Redis, the store's repository, and a publisher that records ------------------------


def _repository(redis: Redis, kek: KeyEncryptionKey, history_depth: int = 10) -> StateRepository:
    """The store's repository with ``kek`` as its only key-encryption key."""
    return StateRepository(redis, KeyRing(kek), history_depth=history_depth)


@pytest.fixture
def redis(private_redis: PrivateDatabase) -> Redis:
    return private_redis.client


def _scrubber(
    redis: Redis,
    kek: KeyEncryptionKey,
    publisher: RecordingPublisher,
    temp_dir: Path,
    **options: object,
) -> Scrubber:
    settings: dict[str, object] = {"versions_per_second": 50.0, "interval_s": 0.0}
    settings.update(options)
    return Scrubber(redis, KeyRing(kek), publisher.publish_event, temp_dir=temp_dir, **settings)  # type: ignore[arg-type]


class Vm:
    """A placed VM whose versions are written through the store's repository."""

    def __init__(self, redis: Redis, kek: KeyEncryptionKey) -> None:
        self.vm_id = str(uuid.uuid4())
        self.redis = redis
        self.repository = _repository(redis, kek)
        self.generation = 0

    @classmethod
    async def placed(cls, redis: Redis, kek: KeyEncryptionKey) -> Vm:
        vm = cls(redis, kek)
        mapping = {"host": "host-a", "epoch": 1}
        await awaited(redis.hset(placement_key(vm.vm_id), mapping=mapping))
        return vm

    async def write(
        self, kind: StateKind, content: bytes, *, recorded_hash: str | None = None
    ) -> int:
        """Store ``content`` as the next version; ``recorded_hash`` overrides the hash the
        store records (and the blob is bound to), to make a plaintext that mismatches."""
        self.generation += 1
        digest = recorded_hash or content_hash(content)
        token = FencingToken(epoch=1, generation=self.generation)
        data_key = await self.repository.data_key(self.vm_id)
        binding = blob_associated_data(self.vm_id, kind.value, 1, self.generation, digest)
        result = await self.repository.write_version(
            VersionWrite(
                vm_id=self.vm_id,
                kind=kind,
                host="host-a",
                token=token,
                content_hash=digest,
                size=len(content),
                sealed=encrypt_blob(data_key, compress(content), binding),
            )
        )
        assert result.outcome is WriteOutcome.STORED, result
        return int(result.detail)

    async def flip_byte(self, kind: StateKind, version: int) -> None:
        """Damage the sealed blob in Redis: one bit in the middle of the ciphertext."""
        key = state_blobs_key(self.vm_id, kind)
        sealed = bytearray(await awaited(self.redis.hget(key, str(version))))  # type: ignore[arg-type]
        sealed[len(sealed) // 2] ^= 0x01
        await awaited(self.redis.hset(key, mapping={str(version): bytes(sealed)}))

    async def flags(self, kind: StateKind) -> dict[int, ScrubFlag]:
        raw = await awaited(self.redis.hgetall(state_flags_key(self.vm_id, kind)))
        parsed = {int(k): ScrubFlag.from_json(v) for k, v in raw.items()}
        assert all(flag is not None for flag in parsed.values())
        return {k: v for k, v in parsed.items() if v is not None}


def _nvram(seed: int) -> bytes:
    """An NVRAM-like image: mostly erased flash, a variable store with the canary."""
    body = bytearray(b"\xff" * 64 * 1024)
    body[4096 : 4096 + len(CANARY)] = CANARY
    body[8192:8200] = seed.to_bytes(8, "big")
    return bytes(body)


def _assert_no_canary(*texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        for form in leak_forms(CANARY):
            assert form not in data


# --- Tests -------------------------------------------------------------------------------


async def test_corrupted_versions_are_flagged_and_announced_and_good_ones_are_not(
    redis: Redis, kek: KeyEncryptionKey, tpm_states: dict[str, bytes], scrub_dir: Path
) -> None:
    vm = await Vm.placed(redis, kek)
    tpm_good = await vm.write(StateKind.TPM, tpm_states["a1"])
    tpm_flipped = await vm.write(StateKind.TPM, tpm_states["a2"])
    # Decrypts fine (the binding carries the recorded hash), but the plaintext is other.
    tpm_mismatch = await vm.write(
        StateKind.TPM, tpm_states["a2"], recorded_hash=hashlib.sha256(b"other").hexdigest()
    )
    nvram_good = await vm.write(StateKind.NVRAM, _nvram(1))
    nvram_flipped = await vm.write(StateKind.NVRAM, _nvram(2))
    await vm.flip_byte(StateKind.TPM, tpm_flipped)
    await vm.flip_byte(StateKind.NVRAM, nvram_flipped)
    recorder = RecordingPublisher()
    scrubber = _scrubber(redis, kek, recorder, scrub_dir)
    assert scrubber.uses_swtpm

    with structlog.testing.capture_logs() as logs:
        report = await scrubber.scrub_vm(vm.vm_id)

    assert report.outcome is VmScrubOutcome.SCRUBBED
    assert (report.verified, report.failed, report.ek_changed) == (5, 3, 0)
    assert scrubber.failures == 3
    tpm = await vm.flags(StateKind.TPM)
    nvram = await vm.flags(StateKind.NVRAM)
    assert tpm[tpm_good].ok
    assert tpm[tpm_good].swtpm_loaded
    assert tpm[tpm_good].ek_sha256 is not None
    assert tpm[tpm_good].reason is None
    assert not tpm[tpm_flipped].ok
    assert "decryption failed" in (tpm[tpm_flipped].reason or "")
    assert not tpm[tpm_mismatch].ok
    assert "does not match the recorded" in (tpm[tpm_mismatch].reason or "")
    assert nvram[nvram_good].ok
    assert nvram[nvram_good].ek_sha256 is None
    assert not nvram[nvram_flipped].ok
    failed = {(e.kind, e.version) for e in recorder.of_type(StateScrubFailed)}
    assert failed == {
        (StateKind.TPM, tpm_flipped),
        (StateKind.TPM, tpm_mismatch),
        (StateKind.NVRAM, nvram_flipped),
    }
    assert all(subject == vm.vm_id for _payload, subject in recorder.events)
    assert recorder.of_type(TpmReset) == []
    warnings = [entry for entry in logs if entry["event"] == "stored version failed verification"]
    assert len(warnings) == 3
    print(
        f"swtpm loads: {scrubber.stats.swtpm_loads}, "
        f"{scrubber.stats.swtpm_seconds / scrubber.stats.swtpm_loads:.3f} s each"
    )

    # Scrubbed again: still flagged and counted, but announced only once.
    again = await scrubber.scrub_vm(vm.vm_id)
    assert (again.verified, again.failed) == (5, 3)
    assert scrubber.failures == 6
    assert len(recorder.events) == 3

    # Nothing written or said carries state bytes.
    flag_values = [
        value
        for kind in StateKind
        for value in (await awaited(redis.hgetall(state_flags_key(vm.vm_id, kind)))).values()
    ]
    _assert_no_canary(
        *flag_values,
        *(payload.model_dump_json() for payload, _subject in recorder.events),
        repr(logs),
    )


async def test_a_tpm_manufactured_again_is_flagged_as_a_reset_naming_the_good_version(
    redis: Redis, kek: KeyEncryptionKey, tpm_states: dict[str, bytes], scrub_dir: Path
) -> None:
    vm = await Vm.placed(redis, kek)
    v1 = await vm.write(StateKind.TPM, tpm_states["a1"])
    v2 = await vm.write(StateKind.TPM, tpm_states["a2"])
    v3 = await vm.write(StateKind.TPM, tpm_states["a1"])
    v4 = await vm.write(StateKind.TPM, tpm_states["b1"])
    v5 = await vm.write(StateKind.TPM, tpm_states["b2"])
    # v3 is damaged in Redis too: it must be neither the reset nor the base of comparison.
    await vm.flip_byte(StateKind.TPM, v3)
    recorder = RecordingPublisher()
    scrubber = _scrubber(redis, kek, recorder, scrub_dir)

    started = time.monotonic()
    report = await scrubber.scrub_vm(vm.vm_id, [StateKind.TPM])
    elapsed = time.monotonic() - started

    print(
        f"5 TPM versions in {elapsed:.2f} s; swtpm {scrubber.stats.swtpm_loads} loads, "
        f"{scrubber.stats.swtpm_seconds / scrubber.stats.swtpm_loads:.3f} s each"
    )
    assert (report.verified, report.failed, report.ek_changed) == (5, 1, 1)
    flags = await vm.flags(StateKind.TPM)
    assert flags[v1].ek_sha256 == flags[v2].ek_sha256
    assert flags[v4].ek_sha256 == flags[v5].ek_sha256
    assert flags[v4].ek_sha256 != flags[v2].ek_sha256
    assert not flags[v3].ok
    assert flags[v4].ok
    assert flags[v4].ek_changed
    assert flags[v4].previous_good_version == v2
    assert "endorsement key changed since version 2" in (flags[v4].reason or "")
    for version in (v1, v2, v5):
        assert not flags[version].ek_changed
    (reset,) = recorder.of_type(TpmReset)
    assert isinstance(reset, TpmReset)
    assert (reset.vm_id, reset.version, reset.previous_good_version) == (vm.vm_id, v4, v2)
    assert reset.ek_sha256 == flags[v4].ek_sha256
    assert reset.previous_ek_sha256 == flags[v2].ek_sha256
    assert [(e.version) for e in recorder.of_type(StateScrubFailed)] == [v3]

    # A replica that finds everything verified recently skips it, and still compares a
    # new version against the recorded EKs: the new TPM continuing is not a reset.
    v6 = await vm.write(StateKind.TPM, tpm_states["b1"])
    later = _scrubber(redis, kek, recorder, scrub_dir, interval_s=3600.0)
    report = await later.scrub_vm(vm.vm_id, [StateKind.TPM])
    assert (report.verified, report.fresh, report.ek_changed) == (1, 5, 0)
    assert (await vm.flags(StateKind.TPM))[v6].ok
    assert len(recorder.of_type(TpmReset)) == 1


async def test_two_scrubbers_never_work_on_one_vm_at_once(
    redis: Redis, private_redis: PrivateDatabase, kek: KeyEncryptionKey, scrub_dir: Path
) -> None:
    vms = [await Vm.placed(redis, kek) for _ in range(4)]
    for vm in vms:
        for seed in range(3):
            await vm.write(StateKind.NVRAM, _nvram(seed))
    clients = [Redis.from_url(private_redis.url), Redis.from_url(private_redis.url)]
    try:
        recorder = RecordingPublisher()
        first, second = (
            _scrubber(client, kek, recorder, scrub_dir, versions_per_second=20.0)
            for client in clients
        )

        # Both go for the same VM at the same moment: one works, the other is turned away.
        reports = await asyncio.gather(first.scrub_vm(vms[0].vm_id), second.scrub_vm(vms[0].vm_id))
        assert sorted(r.outcome for r in reports) == [VmScrubOutcome.BUSY, VmScrubOutcome.SCRUBBED]
        assert sum(r.verified for r in reports) == 3
        assert await redis.exists(scrub_lock_key(vms[0].vm_id)) == 0  # released

        # While one holds a VM, the lock is there with a short TTL.
        holder = asyncio.create_task(first.scrub_vm(vms[1].vm_id))
        await asyncio.sleep(0.05)
        assert 0 < await redis.pttl(scrub_lock_key(vms[1].vm_id)) <= 60_000
        assert (await second.scrub_vm(vms[1].vm_id)).outcome is VmScrubOutcome.BUSY
        await holder

        # Whole passes side by side (re-verify only what is older than an hour): every
        # version is verified exactly once between the two, with no VM done by both.
        first, second = (
            _scrubber(client, kek, recorder, scrub_dir, versions_per_second=20.0, interval_s=3600)
            for client in clients
        )
        started = time.monotonic()
        passes = await asyncio.gather(first.run_pass(), second.run_pass())
        elapsed = time.monotonic() - started
        verified = sum(summary.verified for summary in passes)
        print(
            f"two passes: {verified} versions verified in {elapsed:.2f} s, "
            f"busy {sum(summary.busy for summary in passes)}"
        )
        assert sum(summary.vms for summary in passes) == 2 * len(vms)
        assert verified == 3 * 2  # vms[2] and vms[3]; vms[0] and vms[1] are fresh
        for vm in vms:
            flags = await vm.flags(StateKind.NVRAM)
            assert sorted(flags) == [1, 2, 3]
            assert all(flag.ok for flag in flags.values())
        assert recorder.events == []
    finally:
        for client in clients:
            await client.aclose()


async def test_rate_is_bounded_and_the_background_task_stops_cleanly(
    redis: Redis, kek: KeyEncryptionKey, scrub_dir: Path
) -> None:
    vm = await Vm.placed(redis, kek)
    for seed in range(8):
        await vm.write(StateKind.NVRAM, _nvram(seed))
    rate = 10.0
    scrubber = _scrubber(
        redis,
        kek,
        RecordingPublisher(),
        scrub_dir,
        versions_per_second=rate,
        interval_s=3600.0,
        pass_pause_s=0.05,
    )
    started = time.monotonic()
    await scrubber.run_pass()
    first_pass = time.monotonic() - started
    print(f"8 versions at {rate:g}/s took {first_pass:.2f} s")
    # Eight verifications at ten per second need at least seven periods.
    assert first_pass >= 7 / rate
    assert scrubber.stats.versions_verified == 8
    assert len(await vm.flags(StateKind.NVRAM)) == 8

    # In the background: passes follow each other (all fresh now, so they are quick)
    # until stop is set, and then the task ends by itself.
    stop = asyncio.Event()
    task = asyncio.create_task(scrubber.run(stop))
    await asyncio.sleep(0.5)
    stop.set()
    async with asyncio.timeout(5):
        await task
    assert scrubber.stats.passes >= 3
    assert scrubber.stats.versions_verified == 8


async def test_missing_or_foreign_data_keys(
    redis: Redis, kek: KeyEncryptionKey, scrub_dir: Path
) -> None:
    lost, foreign = await Vm.placed(redis, kek), await Vm.placed(redis, kek)
    for vm in (lost, foreign):
        await vm.write(StateKind.NVRAM, _nvram(1))
    recorder = RecordingPublisher()
    scrubber = _scrubber(redis, kek, recorder, scrub_dir)

    # Without its data key a version cannot be restored: that is a failure to flag.
    await redis.delete(data_key_key(lost.vm_id))
    report = await scrubber.scrub_vm(lost.vm_id)
    assert (report.verified, report.failed) == (1, 1)
    assert "data key is missing" in ((await lost.flags(StateKind.NVRAM))[1].reason or "")
    assert await redis.exists(data_key_key(lost.vm_id)) == 0  # the scrubber never makes one

    # A key wrapped by a KEK this replica lacks says nothing about the data: no verdict.
    stranger = KeyEncryptionKey(os.urandom(32))
    await redis.set(data_key_key(foreign.vm_id), wrap_data_key(stranger, new_data_key()).to_bytes())
    report = await scrubber.scrub_vm(foreign.vm_id)
    assert report.outcome is VmScrubOutcome.UNREADABLE
    assert await foreign.flags(StateKind.NVRAM) == {}
    assert len(recorder.of_type(StateScrubFailed)) == 1


async def test_pinned_versions_are_verified_and_flags_follow_what_is_kept(
    redis: Redis, kek: KeyEncryptionKey, scrub_dir: Path
) -> None:
    """A version a snapshot pins outlives the history (a copy in the pinned hashes): it is
    verified from there, and its flag stays; a version kept by neither loses its flag."""
    vm = await Vm.placed(redis, kek)
    vm.repository = _repository(redis, kek, history_depth=2)
    kind = StateKind.NVRAM
    for seed in range(2):
        await vm.write(kind, _nvram(seed))
    # Pin version 1 as a snapshot does: copy its record and blob beside the history.
    for source, pinned in (
        (state_meta_key(vm.vm_id, kind), state_pinned_meta_key(vm.vm_id, kind)),
        (state_blobs_key(vm.vm_id, kind), state_pinned_blobs_key(vm.vm_id, kind)),
    ):
        value = await awaited(redis.hget(source, "1"))
        assert value is not None
        await awaited(redis.hset(pinned, mapping={"1": value}))
    await vm.write(kind, _nvram(7))  # the history trims version 1; the pin keeps it
    key = state_pinned_blobs_key(vm.vm_id, kind)
    sealed = bytearray(await awaited(redis.hget(key, "1")))  # type: ignore[arg-type]
    sealed[-5] ^= 0x80
    await awaited(redis.hset(key, mapping={"1": bytes(sealed)}))
    recorder = RecordingPublisher()
    scrubber = _scrubber(redis, kek, recorder, scrub_dir)

    report = await scrubber.scrub_vm(vm.vm_id)

    assert (report.verified, report.failed) == (3, 1)
    flags = await vm.flags(kind)
    assert sorted(flags) == [1, 2, 3]
    assert not flags[1].ok
    assert flags[2].ok
    assert flags[3].ok
    assert [e.version for e in recorder.of_type(StateScrubFailed)] == [1]

    # The snapshot is deleted: version 1 is kept by nothing, and so is its flag.
    await redis.delete(state_pinned_meta_key(vm.vm_id, kind), key)
    await scrubber.scrub_vm(vm.vm_id)
    assert sorted(await vm.flags(kind)) == [2, 3]


async def test_a_state_swtpm_refuses_is_flagged_and_nothing_is_left_behind(
    redis: Redis, kek: KeyEncryptionKey, tpm_states: dict[str, bytes], scrub_dir: Path
) -> None:
    """Hash right, archive right, but not a TPM: a permall cut short (swtpm refuses it)."""
    permall = unpack_tpm_state(tpm_states["a1"])[PERMALL_NAME]
    broken = pack_tpm_state({PERMALL_NAME: permall[:200]})
    vm = await Vm.placed(redis, kek)
    version = await vm.write(StateKind.TPM, broken)
    recorder = RecordingPublisher()
    scrubber = _scrubber(redis, kek, recorder, scrub_dir)

    report = await scrubber.scrub_vm(vm.vm_id)

    assert (report.verified, report.failed) == (1, 1)
    flag = (await vm.flags(StateKind.TPM))[version]
    assert not flag.ok
    assert "swtpm could not load the state" in (flag.reason or "")
    assert scrubber.stats.swtpm_loads == 2  # tried twice before flagging
    (failed,) = recorder.of_type(StateScrubFailed)
    assert isinstance(failed, StateScrubFailed)
    assert failed.version == version
    _assert_no_canary(flag.reason or "")
    for form in leak_forms(permall[:32]):
        assert form.decode("latin-1") not in (flag.reason or "")


_PROBE_LOOP = """
import asyncio, sys
from pathlib import Path
from keeper_shared.state_format.tpm_archive import unpack_tpm_state
from keeper_state_store.scrub.tpm_probe import probe_tpm_state

async def main() -> None:
    files = unpack_tpm_state(Path(sys.argv[1]).read_bytes())
    while True:
        await probe_tpm_state(files, temp_dir=Path(sys.argv[2]))

asyncio.run(main())
"""


def _swtpm_under(root: Path) -> list[int]:
    """Pids of swtpm processes (anyone's children) serving a state below ``root``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if argv[0].endswith(b"swtpm") and any(str(root).encode() in a for a in argv):
                found.append(int(cmdline.parent.name))
    return found


async def test_probes_left_by_a_killed_scrubber_are_reaped(
    tpm_states: dict[str, bytes], scrub_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL runs no cleanup: a scrubber killed mid-probe leaves its throwaway swtpm
    running (orphaned) and its directory behind. The next pass of any scrubber stops that
    swtpm and removes the directory, and leaves a live scrubber's probe alone."""
    archive = tmp_path / "state.tar"
    archive.write_bytes(tpm_states["a1"])
    live_dir = scrub_dir / f"keeper-scrub-{os.getpid()}-live"
    (live_dir / "tpm2").mkdir(parents=True)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROBE_LOOP, str(archive), str(scrub_dir)
    )
    try:
        # Kill it while one of its swtpm runs (swtpm holds .lock in the state directory).
        async with asyncio.timeout(20):
            while not list(scrub_dir.glob(f"keeper-scrub-{child.pid}-*/tpm2/.lock")):  # noqa: ASYNC110
                await asyncio.sleep(0.002)
        child.kill()  # the child alone, as the OOM killer would; not its process group
        await child.wait()
        orphans = _swtpm_under(scrub_dir)
        print(f"orphaned swtpm after SIGKILL: {orphans}")
        assert list(scrub_dir.glob(f"keeper-scrub-{child.pid}-*"))

        assert reap_stale_probes(scrub_dir) == 1

        async with asyncio.timeout(5):
            while _swtpm_under(scrub_dir):  # noqa: ASYNC110 (processes, not an event)
                await asyncio.sleep(0.02)
        assert [entry.name for entry in scrub_dir.iterdir()] == [live_dir.name]
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        for pid in _swtpm_under(scrub_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(live_dir, ignore_errors=True)


async def test_an_encrypted_tpm_state_is_loaded_with_the_vms_secret(
    redis: Redis, kek: KeyEncryptionKey, scrub_dir: Path, tmp_path: Path, ca_config: Path
) -> None:
    """swtpm cannot load a state written under <encryption secret> without the secret's
    value: the scrubber opens the VM's secret the store keeps and hands it to swtpm, so
    the check proves the stored secret still opens the stored state."""
    vm = await Vm.placed(redis, kek)
    secrets_vault = TpmSecretVault(vm.repository)
    secret = await secrets_vault.held_or_created(vm.vm_id)
    state_dir = tmp_path / "encrypted" / "tpm2"
    await manufacture_tpm_state(
        state_dir, config=ca_config, passphrase=secret.value.get_secret_value()
    )
    version = await vm.write(StateKind.TPM, pack_tpm_state(read_tpm_state_dir(state_dir)))
    scrubber = _scrubber(redis, kek, RecordingPublisher(), scrub_dir)

    report = await scrubber.scrub_vm(vm.vm_id, [StateKind.TPM])

    assert (report.verified, report.failed) == (1, 0)
    flag = (await vm.flags(StateKind.TPM))[version]
    assert flag.ok
    assert flag.swtpm_loaded
    assert flag.ek_sha256 is not None

    # Another secret under the VM's id (as if the value were lost): swtpm refuses the state.
    await awaited(redis.delete(tpm_secret_key(vm.vm_id)))
    await secrets_vault.held_or_created(vm.vm_id)
    report = await _scrubber(redis, kek, RecordingPublisher(), scrub_dir).scrub_vm(
        vm.vm_id, [StateKind.TPM]
    )
    assert (report.verified, report.failed) == (1, 1)
    flag = (await vm.flags(StateKind.TPM))[version]
    assert not flag.ok
    assert "swtpm could not load the state" in (flag.reason or "")


async def test_the_endorsement_key_of_the_newest_tpm_is_read_for_attestation(
    redis: Redis, kek: KeyEncryptionKey, tpm_states: dict[str, bytes], scrub_dir: Path
) -> None:
    """``state.ek.read`` (``keeper vm ek``) loads the newest TPM version into a throwaway
    swtpm and answers the EK's public key and certificate: the certificate certifies that
    key, its fingerprint is the scrubber's, and a TPM manufactured again has another one."""
    vm = await Vm.placed(redis, kek)
    keys = EndorsementKeys(vm.repository, temp_dir=scrub_dir)

    async def read(vm_id: str) -> EndorsementKeyRead:
        request = new_envelope(ReadEndorsementKey(vm_id=vm_id), source="test", subject=vm_id)
        return await keys.on_read(request, Delivery(None, False, None, None))

    nothing = await read(vm.vm_id)
    assert (nothing.ok, nothing.error) == (False, "the store holds no TPM state for this VM")

    await vm.write(StateKind.TPM, tpm_states["a1"])
    newest = await vm.write(StateKind.TPM, tpm_states["a2"])
    first = await read(vm.vm_id)
    assert first.ok, first.error
    assert first.version == newest
    assert first.public_key_pem is not None
    assert first.certificate_pem is not None
    public_key = load_pem_public_key(first.public_key_pem.encode())
    certificate = x509.load_pem_x509_certificate(first.certificate_pem.encode())
    assert certificate.public_key() == public_key
    probe = await probe_tpm_state(unpack_tpm_state(tpm_states["a2"]), temp_dir=scrub_dir)
    assert first.public_area_sha256 == probe.ek_sha256

    await vm.write(StateKind.TPM, tpm_states["b1"])
    manufactured_again = await read(vm.vm_id)
    assert manufactured_again.ok, manufactured_again.error
    assert manufactured_again.public_key_pem != first.public_key_pem
    for text in (first.model_dump_json(), manufactured_again.model_dump_json()):
        _assert_no_canary(text)
