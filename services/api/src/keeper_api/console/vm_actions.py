"""A VM's everyday actions on its console page: start it on a host, shut it down, power it
off (after :mod:`~keeper_api.console.pages`' confirmation), take a snapshot. Each is the
API's own (:mod:`keeper_api.vm_lifecycle`) carried out as an operation; the browser is sent
to the operation's page, which reloads itself while it runs (a ``<meta>`` refresh: the
console has no script) and then says how it ended. Forms are guarded as the console's
others: the SameSite=Strict login cookie, and a reader is refused before anything is
read."""

from __future__ import annotations

from typing import Annotated, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ValidationError

from keeper_api import operations, vm_lifecycle
from keeper_api.console.rendering import page, reader_refusal, refusal
from keeper_api.console.session import State, Who, form_fields, vm_id_of
from keeper_api.models import SnapshotBody, StartBody
from keeper_api.operations import Operation, OperationStatus
from keeper_api.problems import ProblemError, describe_validation
from keeper_shared.keeper_client.outcomes import ExitCode
from keeper_shared.messages.placement import StopMode

router = APIRouter(prefix="/console", include_in_schema=False)

REFRESH_S = 2
"""How often a running operation's page reloads itself."""

Body = TypeVar("Body", bound=BaseModel)

OperationId = Annotated[str, Path(pattern=r"^[0-9a-f-]{36}$")]


def _validated(model: type[Body], **fields: object) -> Body:
    """A form's fields as the API's request body, refused with the API's own words."""
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        raise ProblemError(describe_validation(list(error.errors())), ExitCode.USAGE) from None


def _follow(operation: Operation) -> Response:
    return RedirectResponse(f"/console/operations/{quote(operation.id)}", status_code=303)


@router.post("/vms/{vm}/start")
async def start(request: Request, vm: str, state: State, who: Who) -> Response:
    refused = reader_refusal(request, who)
    if refused is not None:
        return refused
    body = _validated(StartBody, host=(await form_fields(request)).get("host", ""))
    vm_id = await vm_id_of(state, vm)
    return _follow(await vm_lifecycle.begin_start(state, vm_id, body.host, who.name))


async def _stop(request: Request, vm: str, mode: StopMode, state: State, who: Who) -> Response:
    refused = reader_refusal(request, who)
    if refused is not None:
        return refused
    vm_id = await vm_id_of(state, vm)
    return _follow(await vm_lifecycle.begin_stop(state, vm, vm_id, mode, who.name))


@router.post("/vms/{vm}/shutdown")
async def shutdown(request: Request, vm: str, state: State, who: Who) -> Response:
    return await _stop(request, vm, StopMode.SHUTDOWN, state, who)


@router.post("/vms/{vm}/poweroff")
async def poweroff(request: Request, vm: str, state: State, who: Who) -> Response:
    return await _stop(request, vm, StopMode.POWEROFF, state, who)


@router.post("/vms/{vm}/snapshot")
async def snapshot(request: Request, vm: str, state: State, who: Who) -> Response:
    refused = reader_refusal(request, who)
    if refused is not None:
        return refused
    fields = await form_fields(request)
    body = _validated(
        SnapshotBody, snapshot_id=fields.get("snapshot", ""), memory="memory" in fields
    )
    vm_id = await vm_id_of(state, vm)
    operation = await vm_lifecycle.begin_snapshot(
        state, vm_id, body.snapshot_id, who.name, memory=body.memory
    )
    return _follow(operation)


@router.get("/operations/{operation_id}")
async def operation_page(
    request: Request, operation_id: OperationId, state: State, who: Who
) -> HTMLResponse:
    found = await operations.load(state, operation_id)
    if found is None:
        return refusal(request, who, 404, f"no operation {operation_id} (unknown, or expired)")
    running = found.status is OperationStatus.RUNNING
    return page(
        request,
        "operation.html",
        who=who,
        operation=found,
        refresh_s=REFRESH_S if running else None,
    )
