"""A snapshot with memory reverts to the TPM pinned with it, on a real host (libvirtd,
QEMU under TCG, OVMF, swtpm), also after the domain was undefined and defined again.

The VM's TPM holds a known value before it first starts: a TPM manufactured as libvirt
does, with a 32-byte secret written into an owner NV index through tpm2-tools (the guest's
part; no guest OS runs here), put where libvirt keeps it, so the first start uses it. Once
OVMF has booted, ``keeper vm snapshot --memory`` pauses the VM, pins its TPM and NVRAM and
takes the libvirt snapshot (memory to an external file). Then the TPM changes: the same
TPM with another value in that index, as the guest would have written it, becomes the
VM's state on disk and the store persists it as the newest version.

``keeper vm revert`` on the running VM powers it off (which undefines it: libvirt forgets
the snapshot), restores the pinned TPM and NVRAM, defines the domain, redefines the snapshot
from the XML policy kept and brings the memory back: QEMU starts to receive the memory
(its command line has ``-incoming``; a boot has not), and the TPM it runs on holds the
pinned value again. The second revert starts from a VM powered off and undefined: the TPM
and NVRAM the restore writes before QEMU starts are byte for byte the pinned versions, and
the value is the pinned one.

The value is read from a copy of the running VM's state with a throwaway swtpm. QEMU's
memory image carries the TPM's state too (QEMU migrates the emulator's state blobs), so
both agree only because the keeper pinned the state while the guest was paused.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from pathlib import Path

import pytest

from integration.agent.test_real_host import (
    BOOT_DONE,
    BOOT_TIMEOUT_S,
    NAME_PREFIX,
    SWTPM_ROOT,
    RealHost,
    RestoreCapture,
    SerialConsole,
    Stack,
    _libvirt_call,
    _live_xml,
    disk_nvram_content,
    disk_tpm_content,
    real_host,
    stack,
    tpm_dir,
    wait_event,
    wait_persisted_current,
)
from keeper_devtools.swtpm_lab import (
    DEMO_NV_INDEX,
    manufacture_tpm_state,
    nv_read_secret,
    nv_write_secret,
)
from keeper_shared.keeper_client.client import EventWatch
from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm import VmStarted, VmUndefined
from keeper_shared.messages.vm_snapshot import SnapshotMode
from keeper_shared.state_format.blobs import content_hash
from keeper_shared.swtpm import run_tool, start_swtpm

__all__ = ["real_host", "stack"]  # the fixtures, used by name

pytestmark = [
    pytest.mark.real_host,
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.swtpm,
    pytest.mark.timeout(1200),
]

SNAPSHOT_DIR = Path("/var/lib/libvirt/qemu/memory-snapshots")
"""The host agent's default ``snapshot_dir``."""
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
SNAPSHOT = "before-update"
SECRET_SIZE = 32


async def write_value(state_dir: Path, value: bytes, *, replace: bool) -> None:
    """Write ``value`` into the TPM's NV index through a throwaway swtpm on ``state_dir``
    (``replace``: the index exists and is undefined first)."""
    async with await start_swtpm(state_dir) as tpm:
        if replace:
            handle = f"0x{DEMO_NV_INDEX:x}"
            env = {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti, "TSS2_LOG": "all+NONE"}
            undefined = await run_tool(["tpm2_nvundefine", handle, "-C", "o"], env=env, limit_s=30)
            assert undefined.returncode == 0, undefined.stderr[-300:]
        await nv_write_secret(tpm.tcti, DEMO_NV_INDEX, value)


async def value_in(vm_id: str, work_dir: Path) -> bytes:
    """The NV index's value in the TPM the VM runs on, read from a copy of its state."""
    copy = work_dir / "tpm2"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    await asyncio.to_thread(shutil.copytree, tpm_dir(vm_id), copy)
    async with await start_swtpm(copy) as tpm:
        return await nv_read_secret(tpm.tcti, DEMO_NV_INDEX, SECRET_SIZE)


def started_from_memory(name: str) -> bool:
    """Whether libvirt last started the domain's QEMU to receive a saved memory image (the
    command line it logs at each start has ``-incoming``) rather than to boot."""
    log = (QEMU_LOG_DIR / f"{name}.log").read_text(errors="replace")
    starts = log.split(": starting up libvirt version")
    assert len(starts) > 1, f"no QEMU start in {QEMU_LOG_DIR / name}.log"
    return "\n-incoming " in starts[-1]


def _snapshot_names(vm_id: str) -> list[str]:
    """The domain's snapshots as libvirt lists them."""
    return _libvirt_call(
        lambda conn: [str(name) for name in conn.lookupByUUIDString(vm_id).snapshotListNames()]
    )


def pinned(watch: EventWatch, vm_id: str, kind: StateKind, version: int) -> str:
    """The content hash the store announced for ``version`` of ``kind``."""
    found = watch.matching(
        StatePersisted, lambda e: e.vm_id == vm_id and e.kind is kind and e.version == version
    )
    assert found, f"{kind} v{version} of {vm_id} was never announced as persisted"
    return found[0].data.content_hash


async def test_a_memory_snapshot_reverts_to_the_tpm_pinned_with_it_also_after_an_undefine(
    real_host: RealHost, stack: Stack, tmp_path: Path
) -> None:
    client, host = stack.client, stack.host_id
    vm_id = str(uuid.uuid4())
    name = f"{NAME_PREFIX}{vm_id[:8]}"
    spec = VmSpec(vm_id=vm_id, name=name, guest_os="windows-11")
    pinned_value, later_value = os.urandom(SECRET_SIZE), os.urandom(SECRET_SIZE)

    def is_ours(event: Payload) -> bool:
        return getattr(event, "vm_id", None) == vm_id

    try:
        # --- the TPM holds the pinned value before the first start
        await manufacture_tpm_state(tpm_dir(vm_id))
        await write_value(tpm_dir(vm_id), pinned_value, replace=False)
        watch = await client.watch_events("vm.*.*", "state.persisted.*")
        await client.enable_tpm(spec, cluster=host)
        await client.start(vm_id, host)
        await wait_event(watch, VmStarted, is_ours, "vm.started")
        console = SerialConsole(_live_xml(vm_id))
        try:
            await console.wait_for_any(BOOT_DONE, BOOT_TIMEOUT_S)
        finally:
            console.close()
        await wait_persisted_current(watch, vm_id, StateKind.TPM, lambda: disk_tpm_content(vm_id))
        assert await value_in(vm_id, tmp_path / "first") == pinned_value
        assert not started_from_memory(name)

        # --- snapshot with memory: paused, state pinned, libvirt snapshot, resumed
        taken = await client.snapshot(vm_id, SNAPSHOT, memory=True)
        assert taken.mode is SnapshotMode.MEMORY, taken
        versions = dict(taken.versions)
        assert set(versions) == set(StateKind)
        memory_file = SNAPSHOT_DIR / vm_id / f"{SNAPSHOT}.mem"
        assert memory_file.is_file(), "the snapshot's memory is not where the agent puts it"
        pinned_hashes = {
            kind: pinned(watch, vm_id, kind, version) for kind, version in versions.items()
        }

        # --- the TPM changes afterwards, and the store keeps the change as the newest
        changed_dir = tmp_path / "changed" / "tpm2"
        await asyncio.to_thread(shutil.copytree, tpm_dir(vm_id), changed_dir)
        await write_value(changed_dir, later_value, replace=True)
        changed = (changed_dir / "tpm2-00.permall").read_bytes()
        staged = tpm_dir(vm_id) / ".tpm2-00.permall.changed"
        staged.write_bytes(changed)
        staged.replace(tpm_dir(vm_id) / "tpm2-00.permall")
        later, _ = await wait_persisted_current(
            watch, vm_id, StateKind.TPM, lambda: disk_tpm_content(vm_id)
        )
        assert later.data.version > versions[StateKind.TPM]
        assert await value_in(vm_id, tmp_path / "changed-read") == later_value

        # --- revert the running VM: powered off (undefined), restored, reverted
        reverted = await client.revert(vm_id, SNAPSHOT)
        assert reverted.host == host, reverted
        assert started_from_memory(name), "the VM booted instead of reverting"
        assert await value_in(vm_id, tmp_path / "reverted") == pinned_value

        # --- undefined (libvirt forgets the snapshot), then reverted again
        assert await client.stop(vm_id, StopMode.POWEROFF), "the final state was not retrieved"
        await wait_event(watch, VmUndefined, is_ours, "vm.undefined after the power-off")
        assert disk_tpm_content(vm_id) is None
        assert disk_nvram_content(name) is None
        assert memory_file.is_file(), "the memory file went with the domain"
        capture = RestoreCapture(vm_id, name)
        capture.start()
        try:
            again = await client.revert(vm_id, SNAPSHOT)
        finally:
            capture.stop()
        assert again.epoch is not None
        assert reverted.epoch is not None
        assert again.epoch > reverted.epoch
        assert capture.tpm is not None, "no TPM was restored"
        assert capture.nvram is not None, "no NVRAM was restored"
        assert content_hash(capture.tpm) == pinned_hashes[StateKind.TPM]
        assert content_hash(capture.nvram) == pinned_hashes[StateKind.NVRAM]
        assert started_from_memory(name), "the VM booted instead of reverting"
        assert await value_in(vm_id, tmp_path / "reverted-again") == pinned_value

        # --- deleted while the domain runs: libvirt's record and the memory file go
        assert SNAPSHOT in _snapshot_names(vm_id)
        deleted = await client.delete_snapshot(vm_id, SNAPSHOT)
        assert (deleted.deleted, deleted.memory_deleted_on) == (True, host), deleted
        assert SNAPSHOT not in _snapshot_names(vm_id)
        assert not memory_file.exists(), "the snapshot's memory outlived it"

        assert await client.stop(vm_id, StopMode.POWEROFF)
        codes = await stack.stop_services()
        assert set(codes.values()) == {0}, codes
        for service in stack.services:
            assert b"Traceback" not in service.log_path.read_bytes(), service.log_path
    finally:
        # The snapshot's deletion removes the memory file; a failed test may not get there.
        shutil.rmtree(SNAPSHOT_DIR / vm_id, ignore_errors=True)
        shutil.rmtree(SWTPM_ROOT / vm_id, ignore_errors=True)
