"""Starting, stopping and snapshotting a VM: the requests and checks the JSON routes
(:mod:`keeper_api.vm_routes`) and the console's forms (:mod:`keeper_api.console.vm_actions`)
both carry out, so the two cannot drift apart. Start and stop are long: they begin an
operation (:mod:`keeper_api.operations`) whose record says how they ended."""

from __future__ import annotations

from typing import Any

from keeper_api import operations
from keeper_api.operations import Operation
from keeper_api.problems import ProblemError
from keeper_api.state import ApiState
from keeper_shared.keeper_client import views
from keeper_shared.keeper_client.outcomes import ExitCode
from keeper_shared.messages.placement import StopMode


async def begin_start(
    state: ApiState, vm_id: str, host: str, requested_by: str, *, domain_xml: str | None = None
) -> Operation:
    """Start the VM on ``host`` (policy puts its stored state there first)."""

    async def work() -> dict[str, Any]:
        placed = await state.keeper.place(vm_id, host, domain_xml=domain_xml)
        return {"vm_id": vm_id, "host": host, "epoch": placed.epoch, "started": True}

    return await operations.start(state, "vm.start", vm_id, requested_by, work)


async def begin_stop(
    state: ApiState, reference: str, vm_id: str, mode: StopMode, requested_by: str
) -> Operation:
    """Stop a running VM (``shutdown`` asks the guest, ``poweroff`` cuts it off); refused
    (409) when it runs nowhere, as the CLI refuses it."""
    found = await views.vm_status(state.keeper, vm_id)
    if found is None or found.host is None:
        raise ProblemError(f"{reference} is not running", ExitCode.REFUSED)

    async def work() -> dict[str, Any]:
        stopped = await state.keeper.stop_vm(vm_id, mode)
        return {"vm_id": vm_id, "mode": mode.value, "stopped": True, "retrieved": stopped.retrieved}

    return await operations.start(state, f"vm.{mode.value}", vm_id, requested_by, work)


async def take_snapshot(
    state: ApiState, vm_id: str, snapshot_id: str, *, memory: bool
) -> dict[str, Any]:
    """Pin the VM's newest state as ``snapshot_id``; with ``memory`` (a running VM), policy
    saves the guest's memory on its host too. Returns the pinned version per kind."""
    if memory:
        detail = await state.keeper.snapshot(vm_id, snapshot_id, memory=True)
        versions = {k.value: int(v) for k, v in detail.versions.items()}
    else:
        pinned = await state.keeper.create_snapshot(vm_id, snapshot_id)
        versions = {k.value: v for k, v in pinned.items()}
    return {"vm_id": vm_id, "snapshot_id": snapshot_id, "versions": versions}


async def begin_snapshot(
    state: ApiState, vm_id: str, snapshot_id: str, requested_by: str, *, memory: bool
) -> Operation:
    """:func:`take_snapshot` as an operation, for callers that follow one (the console:
    a snapshot with memory pauses the guest while its memory is written)."""

    async def work() -> dict[str, Any]:
        return await take_snapshot(state, vm_id, snapshot_id, memory=memory)

    return await operations.start(state, "vm.snapshot", vm_id, requested_by, work)
