"""The console's pages (``/console``): VMs, one VM with its history timeline and
snapshots, hosts; and the confirmations that say what will be lost before deleting state,
disabling a TPM, restoring an older version, deleting a snapshot or powering a VM off.
The browser logs in with an API token (kept in an HttpOnly, SameSite=Strict cookie, so
another site cannot make it post a form); a reader sees everything and is refused every
change. Starting, stopping and snapshotting a VM: :mod:`keeper_api.console.vm_actions`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from keeper_api.auth import CONSOLE_COOKIE
from keeper_api.console import vm_actions
from keeper_api.console.rendering import HERE, ago, page, reader_refusal, refusal
from keeper_api.console.session import (
    LoginNeededError,
    State,
    Who,
    form_fields,
    vm_id_of,
)
from keeper_api.failures import BUS_FAILURES, as_problem
from keeper_api.problems import ProblemError
from keeper_api.resolving import require_stopped
from keeper_api.state import ApiState, api_state
from keeper_shared.keeper_client import views
from keeper_shared.keeper_client.loss import describe_loss
from keeper_shared.messages.queries import Liveness
from keeper_shared.messages.state import StateVersionInfo
from keeper_shared.messages.types import StateKind

router = APIRouter(prefix="/console", include_in_schema=False)

ACTIONS = {
    "delete-state": "Delete the stored state",
    "disable-tpm": "Disable the TPM",
    "restore": "Restore an older version",
    "delete-snapshot": "Delete a snapshot",
    "poweroff": "Power off",
}
"""What a confirmation page may ask about. Power off is confirmed here and carried out by
:mod:`keeper_api.console.vm_actions` (an operation, as the API's route)."""


@dataclass(frozen=True)
class TimelineEntry:
    """One stored version on the VM's timeline (both kinds, newest first)."""

    kind: str
    item: StateVersionInfo
    head: bool


@router.get("/login")
async def login_form(request: Request) -> HTMLResponse:
    return page(request, "login.html", who=None, message=None)


@router.post("/login")
async def login(request: Request) -> Response:
    token = (await form_fields(request)).get("token", "")[:512]
    found = api_state(request).tokens.caller(token.strip())
    if found is None:
        return page(request, "login.html", 401, who=None, message="That token is not valid.")
    answer = RedirectResponse("/console", status_code=303)
    answer.set_cookie(
        CONSOLE_COOKIE,
        token.strip(),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return answer


@router.post("/logout")
async def logout() -> Response:
    answer = RedirectResponse("/console/login", status_code=303)
    answer.delete_cookie(CONSOLE_COOKIE, path="/")
    return answer


@router.get("")
async def vm_list(request: Request, state: State, who: Who) -> HTMLResponse:
    now = time.time()
    statuses = await views.vm_statuses(state.keeper)
    unprotected = await state.keeper.list_unprotected()
    rows = []
    for item in statuses:
        newest = item.newest_stored_at()
        age = None if newest is None else max(0.0, now - newest)
        rows.append(
            {
                "vm": item,
                "age": age,
                "stale": age is None or age > state.settings.stale_after_s,
            }
        )
    return page(
        request,
        "vms.html",
        who=who,
        rows=rows,
        unprotected=unprotected,
        stale_after=ago(state.settings.stale_after_s).removesuffix(" ago"),
    )


@router.get("/hosts")
async def hosts(request: Request, state: State, who: Who) -> HTMLResponse:
    now = time.time()
    found = await views.host_statuses(state.keeper)
    statuses = await views.vm_statuses(state.keeper)
    flagged = [item for item in statuses if item.lost_from or item.tpm_reset or item.tpm_stranded]
    return page(request, "hosts.html", who=who, hosts=found, now=now, flagged=flagged)


@router.get("/vms/{vm}")
async def vm_page(request: Request, vm: str, state: State, who: Who) -> HTMLResponse:
    vm_id = await vm_id_of(state, vm)
    status = await views.vm_status(state.keeper, vm_id)
    history = await state.keeper.state_history(vm_id)
    snapshots = await state.keeper.list_snapshots(vm_id)
    hosts = await views.host_statuses(state.keeper)
    timeline = sorted(
        (
            TimelineEntry(kind.kind.value, item, item.version == kind.head_version)
            for kind in history.kinds
            for item in kind.versions
        ),
        key=lambda entry: entry.item.stored_at,
        reverse=True,
    )
    return page(
        request,
        "vm.html",
        who=who,
        vm_id=vm_id,
        status=status,
        timeline=timeline,
        snapshots=snapshots,
        running=status is not None and status.host is not None,
        live_hosts=[item.host for item in hosts if item.status == Liveness.ALIVE.value],
        now=time.time(),
    )


def _kind(raw: str | None) -> StateKind | None:
    """The state kind a form or link names; None for none or an unknown one."""
    return next((kind for kind in StateKind if kind.value == raw), None)


async def _what_is_lost(
    state: ApiState,
    vm_id: str,
    action: str,
    version: int | None,
    snapshot: str | None,
    kind: StateKind | None,
) -> list[str]:
    if action == "poweroff":
        return [
            "what the guest has not written to its disk: unsaved files, its memory",
            "nothing of its TPM and NVRAM: they are saved while it still runs, then it stops",
        ]
    history = await state.keeper.state_history(vm_id)
    snapshots = await state.keeper.list_snapshots(vm_id)
    if action in ("delete-state", "disable-tpm"):
        lost = describe_loss(history, snapshots)
        if action == "disable-tpm":
            lost.append("the VM's registration: it is no longer protected")
        return lost or ["nothing is stored"]
    if action == "restore":
        newer = [
            f"{kind.kind.value} v{version + 1}..v{kind.head_version} stop being the newest"
            for kind in history.kinds
            if version is not None and kind.head_version is not None and kind.head_version > version
        ]
        return (
            [*newer, "the guest loses what it sealed into its TPM since"]
            if newer
            else ["nothing newer is stored"]
        )
    return [
        f"snapshot {snapshot}",
        "TPM and NVRAM versions that only this snapshot keeps; they cannot be restored afterwards",
        "its memory, if it was taken with memory (deleted on the host that holds it)",
    ]


@router.get("/vms/{vm}/confirm/{action}")
async def confirm(
    request: Request,
    vm: str,
    action: str,
    state: State,
    who: Who,
    version: int | None = None,
    snapshot: str | None = None,
    host: str | None = None,
    kind: str | None = None,
) -> HTMLResponse:
    if action not in ACTIONS:
        return refusal(request, who, 404, f"no action {action!r}")
    vm_id = await vm_id_of(state, vm)
    lost = await _what_is_lost(state, vm_id, action, version, snapshot, _kind(kind))
    return page(
        request,
        "confirm.html",
        who=who,
        vm=vm,
        vm_id=vm_id,
        action=action,
        title=ACTIONS[action],
        lost=lost,
        version=version,
        snapshot=snapshot,
        host=host,
        kind=_kind(kind),
        hosts=[item.host for item in await views.host_statuses(state.keeper)],
    )


@router.post("/vms/{vm}/{action}")
async def carry_out(
    request: Request,
    vm: str,
    action: str,
    state: State,
    who: Who,
) -> Response:
    refused = reader_refusal(request, who)
    if refused is not None:
        return refused
    fields = await form_fields(request)
    raw_version, snapshot, host = fields.get("version"), fields.get("snapshot"), fields.get("host")
    version = int(raw_version) if raw_version and raw_version.isdigit() else None
    kind = _kind(fields.get("kind"))
    if action not in ACTIONS:
        return refusal(request, who, 404, f"no action {action!r}")
    vm_id = await vm_id_of(state, vm)
    keeper = state.keeper
    if action in ("delete-state", "disable-tpm"):
        await require_stopped(keeper, vm, vm_id, "try again")
        if action == "disable-tpm":
            await keeper.disable_tpm(vm_id, reason=f"console: {who.name}")
            return RedirectResponse("/console", status_code=303)
        await keeper.delete_state(vm_id, reason=f"console: {who.name}")
    elif action == "delete-snapshot" and snapshot:
        await keeper.delete_snapshot(vm_id, snapshot)
    elif action == "restore" and version is not None and host and kind is not None:
        await require_stopped(keeper, vm, vm_id, "restore")
        # Only the kind whose version was chosen goes back; the other keeps its newest.
        await keeper.place(vm_id, host, versions={kind: version}, allow_older=True)
    else:
        return refusal(request, who, 422, "missing version, kind, host or snapshot")
    return RedirectResponse(f"/console/vms/{quote(vm)}", status_code=303)


def mount(app: FastAPI) -> None:
    """Add the console's routes, static files and error pages to ``app``."""
    # The VM actions first: this module's ``POST /vms/{vm}/{action}`` would take them.
    app.include_router(vm_actions.router)
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")

    async def to_login(_request: Request, _error: Exception) -> Response:
        return RedirectResponse("/console/login", status_code=303)

    app.add_exception_handler(LoginNeededError, to_login)


async def console_failure(request: Request, error: Exception) -> Response | None:
    """A failure on a console page as a page (the API's routes answer problem details)."""
    if not request.url.path.startswith("/console"):
        return None
    if isinstance(error, ProblemError):
        return refusal(request, None, error.status, error.detail)
    if isinstance(error, BUS_FAILURES):
        problem = as_problem(error, changes=request.method == "POST")
        return refusal(request, None, problem.status, problem.detail)
    return None
