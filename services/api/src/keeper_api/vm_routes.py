"""``/api/v1/vms``: what ``keeper vm ...`` does, over HTTP. Each route sends the CLI's
requests (:class:`KeeperClient`) with the CLI's checks first (unknown VM, running VM);
long ones answer 202 with an operation (:mod:`keeper_api.operations`). Destructive routes
do not ask: the caller confirms by calling them (the console asks first)."""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import ValidationError

from keeper_api import operations, vm_lifecycle
from keeper_api.auth import Operator, Reader
from keeper_api.models import (
    AdoptBody,
    CloneBody,
    EnableTpmBody,
    ExportBody,
    ImportBody,
    ReasonBody,
    RestoreBody,
    RevertBody,
    SnapshotBody,
    StartBody,
)
from keeper_api.operations import Operation
from keeper_api.problems import Problem, ProblemError
from keeper_api.resolving import require_stopped, resolve
from keeper_api.state import ApiState, api_state
from keeper_shared.keeper_client import views
from keeper_shared.keeper_client.loss import describe_loss
from keeper_shared.keeper_client.outcomes import ExitCode
from keeper_shared.messages.adoption import AdoptVm, VmAdoptionResult
from keeper_shared.messages.endorsement import EndorsementKeyRead
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.replies import EnableTpmReply
from keeper_shared.messages.snapshot import SnapshotInfo
from keeper_shared.messages.state import StateHistory
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import VM_NAME_PATTERN, StateKind

PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {"application/problem+json": {}}}
    for status in (401, 403, 404, 409, 422, 503, 504)
}

router = APIRouter(prefix="/api/v1/vms", tags=["vms"], responses=PROBLEMS)

VmRef = Annotated[
    str, Path(pattern=VM_NAME_PATTERN, description="A VM id or a libvirt domain name.")
]
State = Annotated[ApiState, Depends(api_state)]


def _accepted(response: Response, request: Request, operation: Operation) -> Operation:
    response.status_code = 202
    response.headers["Location"] = str(request.url_for("operation", operation_id=operation.id))
    return operation


@router.get("", summary="Every VM with its protection and newest stored state")
async def list_vms(state: State, _: Reader) -> dict[str, Any]:
    now = time.time()
    statuses = await views.vm_statuses(state.keeper)
    unprotected = await state.keeper.list_unprotected()
    return {
        "vms": [item.as_json(now) for item in statuses],
        "unprotected": [views.unprotected_json(item) for item in unprotected],
    }


@router.post("", status_code=201, summary="Enable a TPM: register a VM")
async def enable_tpm(body: EnableTpmBody, state: State, _: Operator) -> EnableTpmReply:
    try:
        spec = VmSpec(
            vm_id=body.vm_id or str(uuid.uuid4()),
            name=body.name,
            arch=body.arch,
            machine=body.machine,
            firmware=body.firmware,
            memory_mib=body.memory_mib,
            guest_os=body.guest_os,
            secure_boot=body.secure_boot,
            encrypt_tpm_state=body.encrypt_state,
        )
    except ValidationError as error:
        raise ProblemError(str(error.errors()[0]["msg"]), ExitCode.USAGE) from None
    return await state.keeper.request_tpm(
        spec,
        override=body.override,
        override_guest_os=body.override_guest_os,
        allow_duplicate_name=body.allow_duplicate_name,
    )


@router.get("/{vm}", summary="One VM's status")
async def show(vm: VmRef, state: State, _: Reader) -> dict[str, Any]:
    vm_id = await resolve(state.keeper, vm)
    found = await views.vm_status(state.keeper, vm_id)
    if found is None:  # stored state only (imported or cloned, not registered yet)
        (stored,) = await state.keeper.describe_stored_state([vm_id])
        return {"vm_id": vm_id, "registered": False, "stored": stored.model_dump(mode="json")}
    return found.as_json(time.time())


@router.get("/{vm}/history", summary="Every kept version of TPM and NVRAM")
async def history(vm: VmRef, state: State, _: Reader) -> StateHistory:
    return await state.keeper.state_history(await resolve(state.keeper, vm))


@router.get("/{vm}/snapshots", summary="The VM's snapshots, oldest first")
async def snapshots(vm: VmRef, state: State, _: Reader) -> list[SnapshotInfo]:
    return await state.keeper.list_snapshots(await resolve(state.keeper, vm))


@router.get("/{vm}/endorsement-key", summary="The EK of the newest stored TPM")
async def endorsement_key(vm: VmRef, state: State, _: Reader) -> EndorsementKeyRead:
    return await state.keeper.endorsement_key(await resolve(state.keeper, vm))


@router.get("/{vm}/loss", summary="What deleting the VM's state would lose")
async def loss(vm: VmRef, state: State, _: Reader) -> dict[str, Any]:
    vm_id = await resolve(state.keeper, vm)
    lost = describe_loss(
        await state.keeper.state_history(vm_id), await state.keeper.list_snapshots(vm_id)
    )
    return {"vm_id": vm_id, "lost": lost}


@router.post("/{vm}/start", status_code=202, summary="Start on a host (an operation)")
async def start(
    vm: VmRef, body: StartBody, request: Request, response: Response, state: State, who: Operator
) -> Operation:
    vm_id = await resolve(state.keeper, vm)
    operation = await vm_lifecycle.begin_start(
        state, vm_id, body.host, who.name, domain_xml=body.domain_xml
    )
    return _accepted(response, request, operation)


async def _stop(
    vm: str, mode: StopMode, request: Request, response: Response, state: ApiState, who: str
) -> Operation:
    vm_id = await resolve(state.keeper, vm)
    operation = await vm_lifecycle.begin_stop(state, vm, vm_id, mode, who)
    return _accepted(response, request, operation)


@router.post("/{vm}/shutdown", status_code=202, summary="Guest shutdown (an operation)")
async def shutdown(
    vm: VmRef, request: Request, response: Response, state: State, who: Operator
) -> Operation:
    return await _stop(vm, StopMode.SHUTDOWN, request, response, state, who.name)


@router.post("/{vm}/poweroff", status_code=202, summary="Power off (an operation)")
async def poweroff(
    vm: VmRef, request: Request, response: Response, state: State, who: Operator
) -> Operation:
    return await _stop(vm, StopMode.POWEROFF, request, response, state, who.name)


@router.post("/{vm}/restore", status_code=202, summary="Start with an older version or snapshot")
async def restore(
    vm: VmRef,
    body: RestoreBody,
    request: Request,
    response: Response,
    state: State,
    who: Operator,
) -> Operation:
    if (body.version is None) == (body.snapshot is None):
        raise ProblemError("give exactly one of version or snapshot", ExitCode.USAGE)
    if body.snapshot is not None and body.kinds:
        raise ProblemError(
            "kinds go with version: a snapshot restores what it pinned", ExitCode.USAGE
        )
    vm_id = await resolve(state.keeper, vm)
    await require_stopped(state.keeper, vm, vm_id, "restore")
    if body.snapshot is not None:
        names = [item.snapshot_id for item in await state.keeper.list_snapshots(vm_id)]
        if body.snapshot not in names:
            raise ProblemError(f"{vm} has no snapshot {body.snapshot!r}", ExitCode.REFUSED)
    kinds = body.kinds or list(StateKind)
    versions = dict.fromkeys(kinds, body.version) if body.version is not None else None

    async def work() -> dict[str, Any]:
        placed = await state.keeper.place(
            vm_id, body.host, versions=versions, snapshot_id=body.snapshot, allow_older=True
        )
        if placed.already_placed:
            raise ProblemError(
                f"{vm} already runs on {body.host}: nothing was restored", ExitCode.REFUSED
            )
        restored = {kind.value: v for kind, v in sorted(placed.versions.items())}
        return {"vm_id": vm_id, "host": body.host, "epoch": placed.epoch, "versions": restored}

    operation = await operations.start(state, "vm.restore", vm_id, who.name, work)
    return _accepted(response, request, operation)


@router.post("/{vm}/snapshots", status_code=201, summary="Pin the newest state as a snapshot")
async def create_snapshot(
    vm: VmRef, body: SnapshotBody, state: State, _: Operator
) -> dict[str, Any]:
    vm_id = await resolve(state.keeper, vm)
    return await vm_lifecycle.take_snapshot(state, vm_id, body.snapshot_id, memory=body.memory)


@router.delete("/{vm}/snapshots/{snapshot_id}", summary="Delete a snapshot")
async def delete_snapshot(
    vm: VmRef,
    snapshot_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")],
    state: State,
    _: Operator,
) -> dict[str, Any]:
    vm_id = await resolve(state.keeper, vm)
    deleted = await state.keeper.delete_snapshot(vm_id, snapshot_id)
    return {
        "vm_id": vm_id,
        "snapshot_id": snapshot_id,
        "deleted": deleted.deleted,
        "memory_deleted_on": deleted.memory_deleted_on,
        "memory_left_on": deleted.memory_left_on,
    }


@router.post("/{vm}/revert", status_code=202, summary="Go back to a snapshot with memory")
async def revert(
    vm: VmRef, body: RevertBody, request: Request, response: Response, state: State, who: Operator
) -> Operation:
    vm_id = await resolve(state.keeper, vm)
    names = [item.snapshot_id for item in await state.keeper.list_snapshots(vm_id)]
    if body.snapshot_id not in names:
        raise ProblemError(f"{vm} has no snapshot {body.snapshot_id!r}", ExitCode.REFUSED)

    async def work() -> dict[str, Any]:
        reverted = await state.keeper.revert(vm_id, body.snapshot_id)
        versions = {kind.value: v for kind, v in sorted(reverted.versions.items())}
        return {
            "vm_id": vm_id,
            "host": reverted.host,
            "epoch": reverted.epoch,
            "versions": versions,
        }

    operation = await operations.start(state, "vm.revert", vm_id, who.name, work)
    return _accepted(response, request, operation)


@router.post("/{vm}/clone", status_code=202, summary="Copy the newest state to a new VM id")
async def clone(
    vm: VmRef, body: CloneBody, request: Request, response: Response, state: State, who: Operator
) -> Operation:
    vm_id = await resolve(state.keeper, vm)

    async def work() -> dict[str, Any]:
        versions = await state.keeper.clone_vm(vm_id, body.target_vm_id, body.tpm)
        return {
            "source_vm_id": vm_id,
            "target_vm_id": body.target_vm_id,
            "tpm": body.tpm.value,
            "versions": {k.value: v for k, v in versions.items()},
        }

    operation = await operations.start(state, "vm.clone", body.target_vm_id, who.name, work)
    return _accepted(response, request, operation)


@router.post(
    "/{vm}/export",
    summary="The newest state as an encrypted bundle (application/octet-stream)",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def export(vm: VmRef, body: ExportBody, state: State, _: Operator) -> Response:
    vm_id = await resolve(state.keeper, vm)
    bundle = await state.keeper.export_state(vm_id, body.passphrase)
    return Response(
        bundle,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{vm_id}.bundle"'},
    )


@router.post("/import", status_code=202, summary="Store a bundle for a VM without state")
async def import_state(
    body: ImportBody, request: Request, response: Response, state: State, who: Operator
) -> Operation:
    try:
        bundle = base64.b64decode(body.bundle_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ProblemError("bundle_base64: not base64", ExitCode.USAGE) from None

    async def work() -> dict[str, Any]:
        imported = await state.keeper.import_state(
            bundle, body.passphrase, target_vm_id=body.target_vm_id
        )
        return {"vm_id": imported, "imported": True}

    operation = await operations.start(state, "vm.import", body.target_vm_id, who.name, work)
    return _accepted(response, request, operation)


async def _delete(vm: str, state: ApiState, *, disable: bool, reason: str) -> dict[str, Any]:
    vm_id = await resolve(state.keeper, vm)
    await require_stopped(
        state.keeper, vm, vm_id, "disable its TPM" if disable else "delete its state"
    )
    reply = (
        await state.keeper.disable_tpm(vm_id, reason=reason)
        if disable
        else await state.keeper.delete_state(vm_id, reason=reason)
    )
    deleted = {
        **{f"{kind.value}_versions": reply.deleted_versions.get(kind, 0) for kind in StateKind},
        "snapshots": reply.deleted_snapshots,
    }
    return {"vm_id": vm_id, "tpm_disabled": disable, "deleted": deleted}


@router.delete("/{vm}/state", summary="Delete a stopped VM's stored state (for good)")
async def delete_state(vm: VmRef, state: State, _: Operator, reason: str = "") -> dict[str, Any]:
    return await _delete(vm, state, disable=False, reason=reason[:500])


@router.post("/{vm}/disable-tpm", summary="Delete the state and the registration (for good)")
async def disable_tpm(vm: VmRef, body: ReasonBody, state: State, _: Operator) -> dict[str, Any]:
    return await _delete(vm, state, disable=True, reason=body.reason)


@router.post("/{vm}/accept-tpm", summary="Accept the newest stored TPM after a reset")
async def accept_tpm(vm: VmRef, state: State, who: Operator) -> dict[str, Any]:
    vm_id = await resolve(state.keeper, vm)
    accepted = await state.keeper.accept_tpm(vm_id, requested_by=who.name)
    return {"vm_id": vm_id, "version": accepted.version, "reset_version": accepted.reset_version}


@router.post("/{vm}/adopt", summary="Adopt a domain a host reported")
async def adopt(vm: VmRef, body: AdoptBody, state: State, _: Operator) -> VmAdoptionResult:
    request = AdoptVm(
        vm=vm,
        host=body.host,
        guest_os=body.guest_os,
        override=body.override,
        override_guest_os=body.override_guest_os,
    )
    result = await state.keeper.adopt(request)
    if not result.adopted:
        raise ProblemError("; ".join(result.reasons) or "not adopted", ExitCode.REFUSED)
    return result
