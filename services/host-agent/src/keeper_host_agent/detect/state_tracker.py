"""Per-VM view of TPM and NVRAM state: what is stable now, and what was announced.

A poke (from inotify or the stat rescan) starts at most one stability check per VM and kind;
pokes that arrive during a check make it run once more afterwards, so no change is missed and
no burst of writes causes a burst of reads.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from keeper_host_agent.detect.generation_clock import GenerationClock
from keeper_host_agent.detect.inline_state import inline_candidate
from keeper_host_agent.detect.state_reader import (
    FileStat,
    StateLocation,
    StateSnapshot,
    read_stable,
    signature_size,
)
from keeper_host_agent.hypervisor.domain_xml import DomainStateLocation
from keeper_shared.messages.host import VmInventoryEntry
from keeper_shared.messages.state import StateChange
from keeper_shared.messages.types import FencingToken, StateBlob, StateKind
from keeper_shared.runtime.cpu_work import run_sized
from keeper_shared.state_format.blobs import seal_blob

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StableState:
    """What is remembered of the last stable read: enough to notice a change, not the
    content itself (a host keeps a thousand 540 KB NVRAMs; their compressed blob suffices)."""

    signature: tuple[FileStat, ...]
    content_hash: str


@dataclass
class TrackedState:
    """One kind of state of one VM."""

    location: StateLocation
    stable: StableState | None = None
    blob: StateBlob | None = None
    check: asyncio.Task[None] | None = None
    poked_during_check: bool = False
    announcing: bool = False
    """The check has read and sealed the stable state and waits only for the broker."""


@dataclass
class TrackedVm:
    """A VM with a TPM or NVRAM on this host."""

    domain: DomainStateLocation
    states: dict[StateKind, TrackedState] = field(default_factory=dict)


class Announce(Protocol):
    """Hands one change to the bus, with the blob it announces when that may travel
    inline; returns once the broker has it."""

    async def __call__(self, change: StateChange, inline: StateBlob | None, /) -> None: ...


class StateTracker:
    """Tracks every TPM/UEFI VM on the host and announces stable changes."""

    def __init__(
        self, *, window_s: float, announce: Announce, generation_mark: Path | None = None
    ) -> None:
        self._window_s = window_s
        self._announce_change = announce
        self._clock = GenerationClock(generation_mark)
        self.swtpm_version: str | None = None
        """This host's swtpm version, recorded in every blob (set once it is probed)."""
        self.vms: dict[str, TrackedVm] = {}
        self._inventory: list[VmInventoryEntry] | None = None
        """The heartbeat's inventory as last built; None once a VM, its epoch or a stable
        hash changed. An idle host with 1,000 VMs spent most of its CPU rebuilding it."""
        self.layout_generation = 0
        """Moves whenever the set of tracked VMs or their paths change (what watches need)."""

    def track(self, domain: DomainStateLocation) -> None:
        """Start (or refresh) tracking a domain; its state is read and announced if new."""
        existing = self.vms.get(domain.vm_id)
        if existing is not None and existing.domain == domain:
            return
        tracked = TrackedVm(domain)
        if domain.tpm_dir is not None:
            tracked.states[StateKind.TPM] = TrackedState(
                StateLocation(StateKind.TPM, domain.tpm_dir)
            )
        if domain.nvram_path is not None:
            tracked.states[StateKind.NVRAM] = TrackedState(
                StateLocation(StateKind.NVRAM, domain.nvram_path)
            )
        if existing is not None:
            # Same VM, new placement or paths: keep what was read, announce under the new epoch.
            for kind, state in tracked.states.items():
                old = existing.states.get(kind)
                if old is not None and old.location.path == state.location.path:
                    state.stable = old.stable
        self.vms[domain.vm_id] = tracked
        self._inventory = None
        self.layout_generation += 1
        for kind in tracked.states:
            self.poke(
                domain.vm_id,
                kind,
                force_announce=existing is None or existing.domain.epoch != domain.epoch,
            )

    def untrack(self, vm_id: str) -> None:
        """Stop tracking a VM (undefined, or moved away)."""
        tracked = self.vms.pop(vm_id, None)
        if tracked is None:
            return
        self._inventory = None
        self.layout_generation += 1
        for state in tracked.states.values():
            if state.check is not None:
                state.check.cancel()

    def poke(self, vm_id: str, kind: StateKind, *, force_announce: bool = False) -> None:
        """Something may have changed: make sure a stability check runs."""
        tracked = self.vms.get(vm_id)
        state = tracked.states.get(kind) if tracked else None
        if tracked is None or state is None:
            return
        if state.check is not None and not state.check.done():
            state.poked_during_check = True
            return
        state.check = asyncio.create_task(self._check(tracked, kind, state, force_announce))

    def rescan(self) -> int:
        """Stat every tracked file; poke those whose signature moved. Returns how many."""
        moved = 0
        for vm_id, tracked in list(self.vms.items()):
            for kind, state in tracked.states.items():
                known = state.stable.signature if state.stable else ()
                if state.location.signature() != known:
                    moved += 1
                    self.poke(vm_id, kind)
        return moved

    async def _check(
        self, tracked: TrackedVm, kind: StateKind, state: TrackedState, force_announce: bool
    ) -> None:
        just_stable = False
        while True:
            state.poked_during_check = False
            if just_stable and await run_sized(_stable_size(state), _still_as_stable, state):
                # Poked while checking, but one read shows exactly the state that was just
                # found stable: the poke was a later event of the change already read (a
                # write's MODIFY, then its CLOSE_WRITE), and nothing new is declared
                # stable, so no second window is needed, and a fetch waiting on this check
                # does not wait one; any change since the stable read moves the signature
                # or the hash and gets the full check.
                just_stable = False
                if not state.poked_during_check:
                    return
                continue
            snapshot = await read_stable(state.location, self._window_s)
            just_stable = snapshot is not None
            if snapshot is not None:
                changed = state.stable is None or snapshot.content_hash != state.stable.content_hash
                if changed:
                    self._inventory = None
                state.stable = StableState(snapshot.signature, snapshot.content_hash)
                if changed or force_announce or state.blob is None:
                    try:
                        await self._announce(tracked, kind, state, snapshot)
                    except Exception as error:  # the bus is down or moving to another node
                        # Forgetting the stable state makes the next rescan read and
                        # announce it again; the check itself must not die with the error.
                        state.stable = None
                        self._inventory = None
                        log.warning(
                            "state change not announced, retried on the next rescan",
                            vm_id=tracked.domain.vm_id,
                            kind=kind.value,
                            reason=type(error).__name__,
                        )
                        return
                    force_announce = False
            if not state.poked_during_check:
                return

    async def _announce(
        self, tracked: TrackedVm, kind: StateKind, state: TrackedState, snapshot: StateSnapshot
    ) -> None:
        token = FencingToken(epoch=tracked.domain.epoch, generation=self._clock.next())
        state.blob = await run_sized(
            len(snapshot.content),
            seal_blob,
            kind,
            snapshot.content,
            token,
            self.swtpm_version,
            digest=snapshot.content_hash,
        )
        if tracked.domain.epoch == 0:
            # Not placed by vTPM Keeper: nothing to fence with, so nothing is announced.
            return
        # Per change at debug only: at a boot storm's rates a line per change was a seventh
        # of the agent's CPU. The announcement's own line (one per batch) names every VM.
        log.debug(
            "state stable",
            vm_id=tracked.domain.vm_id,
            kind=kind.value,
            content_hash=snapshot.content_hash[:12],
            size=len(snapshot.content),
        )
        state.announcing = True
        try:
            await self._announce_change(
                StateChange(
                    vm_id=tracked.domain.vm_id,
                    kind=kind,
                    content_hash=snapshot.content_hash,
                    size=len(snapshot.content),
                    token=token,
                ),
                # The blob just built from the stable read: what is inlined is exactly
                # what the hash and token above describe.
                inline_candidate(tracked.domain, state.blob),
            )
        finally:
            state.announcing = False

    async def current_blob(self, vm_id: str, kind: StateKind) -> StateBlob | None:
        """The state as it is now, read stably; None when the VM or the state is absent."""
        tracked = self.vms.get(vm_id)
        state = tracked.states.get(kind) if tracked else None
        if tracked is None or state is None:
            return None
        if state.check is not None and not state.check.done() and not state.announcing:
            # A check that only waits for the broker to confirm its announcement has its
            # blob ready: waiting for it would tie a fetch (a heartbeat's reconciliation
            # included) to a publish stuck in a broker outage.
            await asyncio.shield(state.check)
        if state.stable is None or state.location.signature() != state.stable.signature:
            self.poke(vm_id, kind)
            if state.check is not None:
                await asyncio.shield(state.check)
        return state.blob

    def inventory(self) -> list[VmInventoryEntry]:
        """Every tracked VM with the hashes of its stable state, for the heartbeat; built
        again only after something in it changed (the entries are immutable)."""
        if self._inventory is None:
            self._inventory = self._build_inventory()
        return list(self._inventory)

    def _build_inventory(self) -> list[VmInventoryEntry]:
        def stable_hash(tracked: TrackedVm, kind: StateKind) -> str | None:
            state = tracked.states.get(kind)
            return state.stable.content_hash if state and state.stable else None

        return [
            VmInventoryEntry(
                vm_id=vm_id,
                epoch=tracked.domain.epoch,
                tpm_hash=stable_hash(tracked, StateKind.TPM),
                nvram_hash=stable_hash(tracked, StateKind.NVRAM),
            )
            for vm_id, tracked in self.vms.items()
        ]

    def paths_by_kind(self, kind: StateKind) -> dict[str, str]:
        """Each tracked TPM directory or NVRAM file, mapped to its VM id."""
        return {
            str(tracked.states[kind].location.path): vm_id
            for vm_id, tracked in self.vms.items()
            if kind in tracked.states
        }


def _stable_size(state: TrackedState) -> int:
    """Bytes of the last stable read."""
    return signature_size(state.stable.signature) if state.stable else 0


def _still_as_stable(state: TrackedState) -> bool:
    """One undisturbed read gives the signature and hash of the last stable read."""
    snapshot = state.location.snapshot()
    return (
        snapshot is not None
        and state.stable is not None
        and snapshot.signature == state.stable.signature
        and snapshot.content_hash == state.stable.content_hash
    )
