"""Snapshots with memory as the policy tests look at them: the memory file a host keeps (the
test driver has no QEMU to write one) and the snapshots the store lists."""

from __future__ import annotations

from pathlib import Path

from support.policy_stack import PolicyStack


def plant_memory_file(stack: PolicyStack, host: str, vm_id: str, snapshot_id: str) -> Path:
    """Put a memory file where host ``host`` keeps the snapshot's memory, as QEMU would."""
    path = stack.hosts[host].snapshot_dir / vm_id / f"{snapshot_id}.mem"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"guest memory")
    return path


async def snapshot_names(stack: PolicyStack, vm_id: str) -> list[str]:
    """The VM's snapshots as the store lists them, oldest first."""
    return [info.snapshot_id for info in await stack.client.list_snapshots(vm_id)]
