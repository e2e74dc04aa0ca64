"""``/api/v1/hosts``, ``/api/v1/templates``, ``/api/v1/operations`` and ``/health``."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from keeper_api import operations
from keeper_api.auth import Operator, Reader
from keeper_api.models import CreateTemplateBody, CreateVmFromTemplateBody
from keeper_api.operations import Operation
from keeper_api.problems import ProblemError
from keeper_api.resolving import resolve
from keeper_api.state import ApiState, BusNotReadyError, api_state
from keeper_api.vm_routes import PROBLEMS
from keeper_shared.keeper_client import views
from keeper_shared.keeper_client.outcomes import ExitCode
from keeper_shared.messages.replies import CreateVmFromTemplateReply, DeleteTemplateReply
from keeper_shared.messages.template import CreateTemplate, CreateVmFromTemplate, TemplateView
from keeper_shared.messages.types import VM_NAME_PATTERN

State = Annotated[ApiState, Depends(api_state)]
TemplateRef = Annotated[str, Path(pattern=VM_NAME_PATTERN, description="Name or template id.")]

health = APIRouter(tags=["health"])
hosts = APIRouter(prefix="/api/v1/hosts", tags=["hosts"], responses=PROBLEMS)
templates = APIRouter(prefix="/api/v1/templates", tags=["templates"], responses=PROBLEMS)
polls = APIRouter(prefix="/api/v1/operations", tags=["operations"], responses=PROBLEMS)


@health.get("/health", summary="Liveness of this replica (no token needed)")
async def alive() -> dict[str, str]:
    return {"status": "ok"}


@health.get(
    "/health/ready",
    summary="Readiness of this replica: RabbitMQ reached (no token needed)",
    responses=PROBLEMS,
)
async def ready(state: State) -> dict[str, str]:
    if state.connected is None:
        raise BusNotReadyError(state.bus_problem)  # a 503 `unreachable` problem
    return {"status": "ready"}


@hosts.get("", summary="Every host policy heard from, with liveness and versions")
async def list_hosts(state: State, _: Reader) -> dict[str, Any]:
    now = time.time()
    found = await views.host_statuses(state.keeper)
    return {"hosts": [item.as_json(now) for item in found]}


async def _template(state: ApiState, reference: str) -> TemplateView:
    found = await views.template_named(state.keeper, reference, strict=True)
    if found is None:
        raise ProblemError(f"unknown template {reference!r}", ExitCode.UNKNOWN_VM)
    return found


@templates.get("", summary="Every template, by name")
async def list_templates(state: State, _: Reader) -> list[TemplateView]:
    return await state.keeper.list_templates()


@templates.get("/{template}", summary="One template")
async def show_template(template: TemplateRef, state: State, _: Reader) -> TemplateView:
    return await _template(state, template)


@templates.post("", status_code=201, summary="Make a template from a VM")
async def create_template(body: CreateTemplateBody, state: State, _: Operator) -> TemplateView:
    vm_id = await resolve(state.keeper, body.from_vm)
    request = CreateTemplate(template_id=str(uuid.uuid4()), name=body.name, from_vm_id=vm_id)
    return await state.keeper.create_template(request)


@templates.delete("/{template}", summary="Delete a template and its NVRAM copy")
async def delete_template(template: TemplateRef, state: State, _: Operator) -> DeleteTemplateReply:
    found = await _template(state, template)
    return await state.keeper.delete_template(found.template_id)


@templates.post("/{template}/vms", status_code=201, summary="Register a VM from a template")
async def create_vm(
    template: TemplateRef, body: CreateVmFromTemplateBody, state: State, _: Operator
) -> CreateVmFromTemplateReply:
    found = await _template(state, template)
    request = CreateVmFromTemplate(
        template_id=found.template_id,
        vm_id=body.vm_id or str(uuid.uuid4()),
        name=body.name,
        override=body.override,
        override_guest_os=body.override_guest_os,
        allow_duplicate_name=body.allow_duplicate_name,
    )
    return await state.keeper.create_vm_from_template(request)


@polls.get("/{operation_id}", name="operation", summary="A long operation's status")
async def operation(
    operation_id: Annotated[str, Path(pattern=r"^[0-9a-f-]{36}$")], state: State, _: Reader
) -> Operation:
    found = await operations.load(state, operation_id)
    if found is None:
        raise ProblemError(
            f"no operation {operation_id} (unknown, or expired)", status=404, reason="not-found"
        )
    return found
