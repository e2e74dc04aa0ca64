"""Snapshots through policy, with the real services as processes (the host agents run with
the snapshot commands wired in, as app.py is asked to wire them):

- with memory: the VM is paused, its TPM state retrieved while frozen and pinned, the
  libvirt snapshot taken, the VM resumed; the pinned TPM state is exactly the state at the
  pause, even when the guest's last write had not been announced yet;
- restoring it (a placement from the snapshot) puts that TPM state back, on another host;
- live without memory: the newest persisted state is pinned and its age reported;
- offline: the stored state is pinned.
"""

from __future__ import annotations

import pytest

from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm import VmResumed, VmSuspended
from keeper_shared.messages.vm_snapshot import SnapshotMode, VmSnapshotted
from support.policy_stack import PolicyStack

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="package"),
]


async def pinned_hash(stack: PolicyStack, vm_id: str, version: int) -> tuple[str, list[str]]:
    """Content hash and pinning snapshots of a stored TPM version, as the store lists it."""
    history = await stack.client.state_history(vm_id)
    (tpm,) = [kind for kind in history.kinds if kind.kind is StateKind.TPM]
    (info,) = [info for info in tpm.versions if info.version == version]
    return info.content_hash, list(info.snapshots)


async def test_snapshots_with_memory_live_and_offline(stack: PolicyStack) -> None:
    spec = await stack.new_vm("a")
    vm_id = spec.vm_id
    await stack.write_tpm_persisted("a", vm_id)
    at_pause = stack.write_tpm("a", vm_id)  # the guest's newest write, maybe unannounced

    detail = await stack.client.snapshot(vm_id, "before-upgrade", memory=True)

    assert detail.mode is SnapshotMode.MEMORY
    assert await pinned_hash(stack, vm_id, detail.versions[StateKind.TPM]) == (
        at_pause,
        ["before-upgrade"],
    )
    suspended = await stack.events.wait_for(VmSuspended, lambda e: e.vm_id == vm_id)
    resumed = await stack.events.wait_for(VmResumed, lambda e: e.vm_id == vm_id)
    stored = await stack.events.wait_for(
        StatePersisted, lambda e: e.vm_id == vm_id and e.content_hash == at_pause
    )
    taken = await stack.events.wait_for(VmSnapshotted, lambda e: e.vm_id == vm_id)
    # Causal order only: the pin was persisted before policy resumed the guest. (The
    # host's vm.resumed and policy's vm.snapshotted have no order between them.)
    assert stored.position < resumed.position
    assert suspended.position < resumed.position
    assert stored.position < taken.position
    assert taken.data.mode is SnapshotMode.MEMORY

    # The guest runs on and changes its TPM; the snapshot does not move.
    after = await stack.write_tpm_persisted("a", vm_id)
    assert after != at_pause

    # Live, without memory: the newest persisted state, and how old it is.
    live = await stack.client.snapshot(vm_id, "live-1")
    assert live.mode is SnapshotMode.LIVE
    assert (live.persisted_age_s or 0.0) >= 0
    assert (await pinned_hash(stack, vm_id, live.versions[StateKind.TPM]))[0] == after

    # The libvirt snapshot stays; undefine drops its metadata with the domain.
    stopped = await stack.client.stop_vm(vm_id, StopMode.SHUTDOWN)
    assert stopped.removed

    # Offline: the stored state.
    offline = await stack.client.snapshot(vm_id, "offline-1")
    assert offline.mode is SnapshotMode.OFFLINE

    # Restoring the memory snapshot puts the TPM state of the pause back, elsewhere.
    await stack.client.place(
        vm_id, stack.host_id("b"), snapshot_id="before-upgrade", allow_older=True
    )
    assert stack.hosts["b"].tpm_state_hash(vm_id) == at_pause
    await stack.client.stop_vm(vm_id, StopMode.POWEROFF)
