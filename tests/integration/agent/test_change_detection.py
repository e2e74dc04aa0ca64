"""The host agent's change detection on real files: StateTracker + ChangeWatcher (inotify).

No libvirt and no bus: a `DomainStateLocation` points at directories under ``tmp_path`` and
the tracker's ``publish`` callback records every `StateChange`. The files are written the
way the real writers do it (swtpm: a temporary file renamed over ``tpm2-00.permall``;
OVMF/QEMU: the NVRAM file rewritten in place), and the tests check what reaches the bus:
only stable content (invariant 6), with the hash of the canonical content, never for a VM
Keeper did not place (epoch 0), and found even when inotify saw nothing.

Timing: the stability window is 0.25 s. Nothing asserts that something happened *quickly*;
timeouts only catch hangs. Orderings (published after the writes stopped, not before one
window had passed) are asserted because the product guarantees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from keeper_host_agent.detect.change_watcher import ChangeWatcher
from keeper_host_agent.detect.state_reader import UndisturbedRead
from keeper_host_agent.detect.state_tracker import StateTracker
from keeper_host_agent.hypervisor.domain_xml import DomainStateLocation
from keeper_shared.messages.state import StateChange
from keeper_shared.messages.types import StateBlob, StateKind
from keeper_shared.state_format.blobs import content_hash, open_blob
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state

HOST_ID = "host-cd"
VM_ID = "0d3c4b5a-6978-4a1b-8c2d-3e4f5a6b7c8d"
VM_NAME = "cd-vm"
WINDOW_S = 0.25
NVRAM_SIZE = 540_672
"""The size of OVMF's 2M VARS file; the firmware rewrites it in place."""
QUIET_S = 1.0
"""How long "nothing more is published" is watched for: four stability windows."""
TIMEOUT_S = 15.0
"""Generous bound that only catches hangs."""


@dataclass(frozen=True)
class Published:
    """One StateChange as the tracker handed it to the bus, with when."""

    at: float
    change: StateChange
    inline: StateBlob | None
    """The blob handed over to travel inline with the change."""


class Harness:
    """A tracker for one VM whose state lives under ``tmp_path``, plus its inotify watcher."""

    def __init__(self, tmp_path: Path) -> None:
        self.swtpm_root = tmp_path / "swtpm"
        self.nvram_dir = tmp_path / "nvram"
        self.swtpm_root.mkdir()
        self.nvram_dir.mkdir()
        self.tpm_dir = self.swtpm_root / VM_ID / "tpm2"
        self.nvram_path = self.nvram_dir / f"{VM_NAME}_VARS.fd"
        self.published: list[Published] = []
        self.on_publish: Callable[[StateChange], None] | None = None
        """Called with each change as it is published (to act at that exact moment)."""
        self.confirms: asyncio.Event | None = None
        """When set to an event, each publish waits for it, as for a broker's confirm."""
        self.tracker = StateTracker(window_s=WINDOW_S, announce=self._publish)
        # The periodic rescan is never started here: what is found, inotify (or an explicit
        # rescan() call) found.
        self.watcher = ChangeWatcher(self.tracker, rescan_interval_s=3600)
        self._inotify_task: asyncio.Task[None] | None = None

    async def _publish(self, change: StateChange, inline: StateBlob | None) -> None:
        self.published.append(Published(time.monotonic(), change, inline))
        if self.on_publish is not None:
            self.on_publish(change)
        if self.confirms is not None:
            await self.confirms.wait()

    def location(self, *, epoch: int = 1) -> DomainStateLocation:
        return DomainStateLocation(
            vm_id=VM_ID,
            name=VM_NAME,
            epoch=epoch,
            tpm_dir=self.tpm_dir,
            nvram_path=self.nvram_path,
            arch="x86_64",
            machine="q35",
            tpm_model="tpm-crb",
            tpm_version="2.0",
        )

    def track(self, *, epoch: int = 1) -> None:
        self.tracker.track(self.location(epoch=epoch))

    def start_inotify(self) -> None:
        self.watcher.sync_watches()
        self._inotify_task = asyncio.create_task(self.watcher.watch_inotify())

    def changes(self, kind: StateKind | None = None) -> list[StateChange]:
        return [p.change for p in self.published if kind is None or p.change.kind is kind]

    async def wait_published(self, count: int, timeout_s: float = TIMEOUT_S) -> list[Published]:
        """Wait until at least ``count`` changes were published in total; fail on timeout."""
        deadline = time.monotonic() + timeout_s
        while len(self.published) < count:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"expected {count} published changes within {timeout_s:.0f} s, "
                    f"got {len(self.published)}: {[p.change.kind for p in self.published]}"
                )
            await asyncio.sleep(0.02)
        return self.published

    async def close(self) -> None:
        if self._inotify_task is not None:
            self._inotify_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._inotify_task
        checks = [
            state.check
            for tracked in self.tracker.vms.values()
            for state in tracked.states.values()
            if state.check is not None
        ]
        for vm_id in list(self.tracker.vms):
            self.tracker.untrack(vm_id)
        await asyncio.gather(*checks, return_exceptions=True)
        self.watcher.close()


@pytest_asyncio.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    setup = Harness(tmp_path)
    try:
        yield setup
    finally:
        await setup.close()


def write_like_swtpm(tpm_dir: Path, permall: bytes) -> float:
    """swtpm writes ``TMP2-00.permall`` and renames it over the state; returns when."""
    temporary = tpm_dir / "TMP2-00.permall"
    with temporary.open("wb") as handle:
        handle.write(permall)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(temporary, tpm_dir / MAIN_STATE_FILE_NAME)
    return time.monotonic()


def write_in_place(path: Path, offset: int, data: bytes) -> float:
    """The firmware's way: open the existing file, seek, overwrite; returns when."""
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)
    return time.monotonic()


def churn_nvram(path: Path, versions: int) -> list[float]:
    """Rewrite the NVRAM ``versions`` times, each in two halves 25 ms apart, so a half-old,
    half-new (torn) file is on disk half of the time; returns when each write finished."""
    half = NVRAM_SIZE // 2
    times = []
    for version in range(1, versions + 1):
        content = version_bytes(version, NVRAM_SIZE)
        times.append(write_in_place(path, 0, content[:half]))
        time.sleep(0.025)
        times.append(write_in_place(path, half, content[half:]))
        time.sleep(0.025)
    return times


def make_tpm_dir(tpm_dir: Path) -> None:
    os.makedirs(tpm_dir, mode=0o700)


def tpm_hash(permall: bytes) -> str:
    """The hash a TPM state is published under: sha256 of the canonical archive."""
    return content_hash(pack_tpm_state({MAIN_STATE_FILE_NAME: permall}))


def version_bytes(version: int, size: int) -> bytes:
    """Deterministic content that differs per version."""
    block = hashlib.sha256(f"version {version}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


async def test_tpm_state_written_by_rename_is_published_once_after_it_was_stable(
    harness: Harness,
) -> None:
    make_tpm_dir(harness.tpm_dir)
    harness.track()
    harness.start_inotify()
    await asyncio.sleep(QUIET_S)
    assert harness.published == [], "an empty TPM directory is no state to announce"

    permall = os.urandom(6_000)
    written_at = write_like_swtpm(harness.tpm_dir, permall)
    (first,) = await harness.wait_published(1)
    await asyncio.sleep(QUIET_S)
    assert len(harness.published) == 1, "one write must give exactly one announcement"

    change = first.change
    assert change.kind is StateKind.TPM
    assert change.vm_id == VM_ID
    assert change.content_hash == tpm_hash(permall)
    assert change.size == len(pack_tpm_state({MAIN_STATE_FILE_NAME: permall}))
    assert change.token.epoch == 1
    # Stable means two reads one window apart agreed, so never earlier than that (the 10 %
    # margin is for timer granularity, not speed).
    assert first.at - written_at >= 0.9 * WINDOW_S
    print(f"\nTPM rename detected and published {1000 * (first.at - written_at):.0f} ms after")

    # swtpm saves again: a second version, a newer generation within the same epoch.
    newer = os.urandom(6_100)
    write_like_swtpm(harness.tpm_dir, newer)
    await harness.wait_published(2)
    second = harness.published[1].change
    assert second.content_hash == tpm_hash(newer)
    assert second.token.epoch == 1
    assert second.token.is_newer_than(change.token)


async def test_nvram_written_in_place_is_published_with_the_new_hash(harness: Harness) -> None:
    original = version_bytes(0, NVRAM_SIZE)
    harness.nvram_path.write_bytes(original)
    harness.track()
    harness.start_inotify()
    (initial,) = await harness.wait_published(1)
    assert initial.change.kind is StateKind.NVRAM
    assert initial.change.content_hash == content_hash(original)
    assert initial.change.size == NVRAM_SIZE

    patch = os.urandom(512)
    written_at = write_in_place(harness.nvram_path, 0x2000, patch)
    await harness.wait_published(2)
    updated = harness.published[1]
    expected = original[:0x2000] + patch + original[0x2000 + len(patch) :]
    assert updated.change.content_hash == content_hash(expected)
    assert updated.change.content_hash == content_hash(harness.nvram_path.read_bytes())
    assert updated.change.token.is_newer_than(initial.change.token)
    assert updated.at - written_at >= 0.9 * WINDOW_S
    print(f"\nNVRAM in-place write published {1000 * (updated.at - written_at):.0f} ms after")
    await asyncio.sleep(QUIET_S)
    assert len(harness.published) == 2


async def test_torn_reads_are_never_published(harness: Harness) -> None:
    """Invariant 6: while the NVRAM keeps changing nothing is announced; afterwards exactly
    the final content is, never a torn (half-written) or intermediate version."""
    harness.nvram_path.write_bytes(version_bytes(0, NVRAM_SIZE))
    harness.track()
    harness.start_inotify()
    await harness.wait_published(1)
    before = len(harness.published)

    versions = 30  # 30 x 50 ms = 1.5 s of churn against a 0.25 s window
    # A writer thread, like QEMU beside the agent: stalls of the agent's loop do not pause it.
    write_times = await asyncio.to_thread(churn_nvram, harness.nvram_path, versions)
    stopped_at = time.monotonic()
    longest_gap = max(b - a for a, b in itertools.pairwise(write_times))
    # Precondition, not a speed claim: a writer that paused for a whole window would have
    # left a state that really was stable (and may legitimately be announced).
    assert longest_gap < WINDOW_S, f"writer stalled {1000 * longest_gap:.0f} ms; host overloaded"
    final = harness.nvram_path.read_bytes()
    assert final == version_bytes(versions, NVRAM_SIZE)

    await harness.wait_published(before + 1)
    await asyncio.sleep(QUIET_S)
    during_churn = harness.published[before:]
    assert len(during_churn) == 1, "exactly one announcement for the whole burst"
    (announced,) = during_churn
    assert announced.at >= stopped_at, "nothing may be announced while the file changes"
    assert announced.change.content_hash == content_hash(final)
    # None of the intermediate versions, whole or torn, was ever announced.
    announced_hashes = {p.change.content_hash for p in harness.published}
    assert announced_hashes == {content_hash(version_bytes(0, NVRAM_SIZE)), content_hash(final)}
    # What travels inline is the content that was hashed, never a later read of the file.
    for published in harness.published:
        assert published.inline is not None
        assert published.inline.token == published.change.token
        assert content_hash(open_blob(published.inline)) == published.change.content_hash


async def test_rescan_finds_a_change_inotify_never_reported(harness: Harness) -> None:
    original = version_bytes(0, NVRAM_SIZE)
    harness.nvram_path.write_bytes(original)
    make_tpm_dir(harness.tpm_dir)
    permall = os.urandom(6_000)
    write_like_swtpm(harness.tpm_dir, permall)
    harness.track()  # no inotify at all: only track() itself pokes
    await harness.wait_published(2)
    assert harness.tracker.rescan() == 0, "nothing moved since the stable read"

    patch = os.urandom(4096)
    write_in_place(harness.nvram_path, 0x10000, patch)
    await asyncio.sleep(QUIET_S)
    assert len(harness.published) == 2, "without inotify or a rescan nobody notices"

    assert harness.tracker.rescan() == 1
    await harness.wait_published(3)
    found = harness.published[2].change
    assert found.kind is StateKind.NVRAM
    assert found.content_hash == content_hash(harness.nvram_path.read_bytes())
    await asyncio.sleep(QUIET_S)
    assert len(harness.published) == 3
    assert harness.tracker.rescan() == 0


@pytest.mark.parametrize("mkdir_style", ["mkdir -p", "one level at a time"])
async def test_tpm_directory_created_after_tracking_is_found_by_inotify(
    harness: Harness, mkdir_style: str
) -> None:
    """libvirt creates ``<root>/<uuid>/tpm2`` when the VM first starts, after the agent
    tracked it; the watches on the parents must find it without the periodic rescan."""
    harness.track()
    harness.start_inotify()
    await asyncio.sleep(QUIET_S)
    assert not (harness.swtpm_root / VM_ID).exists()
    assert harness.published == []

    if mkdir_style == "mkdir -p":
        # What libvirt does (virFileMakePathWithMode), with swtpm writing right after.
        make_tpm_dir(harness.tpm_dir)
    else:
        (harness.swtpm_root / VM_ID).mkdir(mode=0o711)
        await asyncio.sleep(0.1)
        harness.tpm_dir.mkdir(mode=0o700)
        await asyncio.sleep(0.1)
    permall = os.urandom(6_000)
    written_at = write_like_swtpm(harness.tpm_dir, permall)

    (found,) = await harness.wait_published(1)
    assert found.change.kind is StateKind.TPM
    assert found.change.content_hash == tpm_hash(permall)
    latency_ms = 1000 * (found.at - written_at)
    print(
        f"\nTPM dir created after tracking ({mkdir_style}): published {latency_ms:.0f} ms "
        f"after the write (stability window {1000 * WINDOW_S:.0f} ms included)"
    )

    # Later saves are seen through the watch on the new directory.
    newer = os.urandom(6_000)
    write_like_swtpm(harness.tpm_dir, newer)
    await harness.wait_published(2)
    assert harness.published[1].change.content_hash == tpm_hash(newer)


async def test_a_fetch_does_not_wait_for_a_confirm_the_broker_has_not_sent(
    harness: Harness,
) -> None:
    # The stable state was read and sealed before it was announced: a publish stuck in a
    # broker outage must not hold up a fetch, nor a heartbeat's reconciliation through one.
    harness.confirms = asyncio.Event()
    make_tpm_dir(harness.tpm_dir)
    harness.track()
    harness.start_inotify()
    permall = os.urandom(6_000)
    write_like_swtpm(harness.tpm_dir, permall)
    await harness.wait_published(1)

    blob = await asyncio.wait_for(harness.tracker.current_blob(VM_ID, StateKind.TPM), TIMEOUT_S)

    assert blob is not None
    assert blob.content_hash == tpm_hash(permall)
    assert open_blob(blob) == pack_tpm_state({MAIN_STATE_FILE_NAME: permall})
    harness.confirms.set()


async def test_current_blob_is_the_stable_state_and_opens_to_the_file_content(
    harness: Harness,
) -> None:
    nvram = version_bytes(7, NVRAM_SIZE)
    harness.nvram_path.write_bytes(nvram)
    make_tpm_dir(harness.tpm_dir)
    permall = os.urandom(6_000)
    write_like_swtpm(harness.tpm_dir, permall)
    harness.track()
    await harness.wait_published(2)

    nvram_blob = await harness.tracker.current_blob(VM_ID, StateKind.NVRAM)
    tpm_blob = await harness.tracker.current_blob(VM_ID, StateKind.TPM)
    assert nvram_blob is not None
    assert tpm_blob is not None
    assert open_blob(nvram_blob) == nvram
    assert open_blob(tpm_blob) == pack_tpm_state({MAIN_STATE_FILE_NAME: permall})
    assert nvram_blob.content_hash == harness.changes(StateKind.NVRAM)[0].content_hash
    assert tpm_blob.token == harness.changes(StateKind.TPM)[0].token

    # Changed behind the tracker's back (no inotify): a fetch must not serve the old bytes.
    patch = os.urandom(1024)
    write_in_place(harness.nvram_path, 0, patch)
    fresh = await asyncio.wait_for(harness.tracker.current_blob(VM_ID, StateKind.NVRAM), TIMEOUT_S)
    assert fresh is not None
    assert open_blob(fresh) == patch + nvram[len(patch) :]
    assert fresh.token.is_newer_than(nvram_blob.token)

    assert await harness.tracker.current_blob(VM_ID.replace("0d3c", "ffff"), StateKind.TPM) is None


async def test_nothing_is_published_for_a_vm_keeper_did_not_place(harness: Harness) -> None:
    """Epoch 0 means no placement by Keeper: no fencing token worth sending, so no event;
    the state is still read (inventory, fetch)."""
    nvram = version_bytes(1, NVRAM_SIZE)
    harness.nvram_path.write_bytes(nvram)
    make_tpm_dir(harness.tpm_dir)
    write_like_swtpm(harness.tpm_dir, os.urandom(6_000))
    harness.track(epoch=0)
    harness.start_inotify()
    write_in_place(harness.nvram_path, 0, os.urandom(256))
    write_like_swtpm(harness.tpm_dir, os.urandom(6_000))
    await asyncio.sleep(QUIET_S + 4 * WINDOW_S)
    assert harness.published == []

    blob = await asyncio.wait_for(harness.tracker.current_blob(VM_ID, StateKind.NVRAM), TIMEOUT_S)
    assert blob is not None
    assert blob.token.epoch == 0
    assert open_blob(blob) == harness.nvram_path.read_bytes()
    (entry,) = harness.tracker.inventory()
    assert entry.epoch == 0
    assert entry.nvram_hash == blob.content_hash
    assert entry.tpm_hash is not None

    # Once Keeper places it (epoch 1), the same state is announced under that epoch.
    harness.track(epoch=1)
    await harness.wait_published(2)
    assert {c.kind for c in harness.changes()} == {StateKind.TPM, StateKind.NVRAM}
    assert all(c.token.epoch == 1 for c in harness.changes())


async def test_the_inventory_is_kept_between_heartbeats_and_follows_every_change(
    harness: Harness,
) -> None:
    """The heartbeat's inventory is built once and reused while nothing changes (an idle
    host with 1,000 VMs spent most of its CPU rebuilding it), yet a new stable hash, a new
    epoch and an untracked VM show in the very next one."""
    harness.nvram_path.write_bytes(version_bytes(1, NVRAM_SIZE))
    make_tpm_dir(harness.tpm_dir)
    write_like_swtpm(harness.tpm_dir, os.urandom(6_000))
    harness.track()
    harness.start_inotify()
    await harness.wait_published(2)
    (first,) = harness.tracker.inventory()
    (again,) = harness.tracker.inventory()
    assert again is first  # not rebuilt: nothing changed

    write_in_place(harness.nvram_path, 0, os.urandom(256))
    await harness.wait_published(3)
    (after_change,) = harness.tracker.inventory()
    assert after_change.nvram_hash == harness.changes(StateKind.NVRAM)[-1].content_hash
    assert after_change.nvram_hash != first.nvram_hash
    assert after_change.tpm_hash == first.tpm_hash

    harness.track(epoch=2)
    (moved,) = harness.tracker.inventory()
    assert moved.epoch == 2

    harness.tracker.untrack(VM_ID)
    assert harness.tracker.inventory() == []


def flood_events(directory: Path, cycles: int) -> None:
    """Queue two inotify events (MODIFY, CLOSE_WRITE) per cycle on an untracked file."""
    noise = directory / "not-state.bin"
    for _ in range(cycles):
        fd = os.open(noise, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)


async def test_inotify_queue_overflow_triggers_a_rescan(harness: Harness) -> None:
    """When the kernel drops events (queue overflow), the watcher rescans at once."""
    max_queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if max_queued > 200_000:
        pytest.skip(f"inotify queue holds {max_queued} events; too many to overflow quickly")
    original = version_bytes(0, NVRAM_SIZE)
    harness.nvram_path.write_bytes(original)
    harness.track()
    await harness.wait_published(1)
    harness.watcher.sync_watches()  # watches exist, but nobody reads the queue yet

    flood_events(harness.nvram_dir, max_queued)  # 2x the queue: it overflows
    patch = os.urandom(2048)
    write_in_place(harness.nvram_path, 0x4000, patch)  # its events are dropped
    harness.start_inotify()

    await harness.wait_published(2)
    assert harness.published[1].change.content_hash == content_hash(harness.nvram_path.read_bytes())


class CountedReads:
    """Counts the full reads (`StateLocation.read`) of one tracked state."""

    def __init__(self, harness: Harness, kind: StateKind) -> None:
        location = harness.tracker.vms[VM_ID].states[kind].location
        self.count = 0
        real_read = location.read

        def counted() -> UndisturbedRead | None:
            self.count += 1
            return real_read()

        location.read = counted  # type: ignore[method-assign]


async def finished_check(harness: Harness, kind: StateKind) -> None:
    """Wait (bounded) for the running stability check of ``kind`` to end."""
    check = harness.tracker.vms[VM_ID].states[kind].check
    assert check is not None
    await asyncio.wait_for(asyncio.shield(check), TIMEOUT_S)


async def test_a_late_event_of_a_change_already_read_costs_one_read_not_a_window(
    harness: Harness,
) -> None:
    harness.nvram_path.write_bytes(version_bytes(0, NVRAM_SIZE))
    harness.track()
    await harness.wait_published(1)
    await finished_check(harness, StateKind.NVRAM)
    reads = CountedReads(harness, StateKind.NVRAM)

    write_in_place(harness.nvram_path, 0x1000, os.urandom(64))
    harness.tracker.poke(VM_ID, StateKind.NVRAM)  # the write's MODIFY starts a check
    await asyncio.sleep(0)
    harness.tracker.poke(VM_ID, StateKind.NVRAM)  # its CLOSE_WRITE arrives during it
    await harness.wait_published(2)
    await finished_check(harness, StateKind.NVRAM)

    # Two reads a window apart made it stable; one more read confirmed the late event
    # changed nothing (before, the check ran a whole second window: two more reads).
    assert reads.count == 3
    assert len(harness.published) == 2


async def test_a_change_right_after_the_stable_read_still_gets_its_own_check(
    harness: Harness,
) -> None:
    harness.nvram_path.write_bytes(version_bytes(0, NVRAM_SIZE))
    harness.track()
    await harness.wait_published(1)
    await finished_check(harness, StateKind.NVRAM)
    final = version_bytes(2, NVRAM_SIZE)

    def write_again_once_announced(change: StateChange) -> None:
        # Between the stable read and the confirming read: exactly what must not be missed.
        if change.content_hash == content_hash(version_bytes(1, NVRAM_SIZE)):
            write_in_place(harness.nvram_path, 0, final)
            harness.tracker.poke(VM_ID, StateKind.NVRAM)

    harness.on_publish = write_again_once_announced
    write_in_place(harness.nvram_path, 0, version_bytes(1, NVRAM_SIZE))
    harness.tracker.poke(VM_ID, StateKind.NVRAM)
    await asyncio.sleep(0)
    harness.tracker.poke(VM_ID, StateKind.NVRAM)  # a late event: the confirming read is due
    await harness.wait_published(3)
    await finished_check(harness, StateKind.NVRAM)

    assert harness.published[2].change.content_hash == content_hash(final)
    blob = await harness.tracker.current_blob(VM_ID, StateKind.NVRAM)
    assert blob is not None
    assert open_blob(blob) == final
