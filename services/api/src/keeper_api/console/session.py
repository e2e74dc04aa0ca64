"""What a console request carries: who the browser is (the API token its login left in an
HttpOnly, SameSite=Strict cookie, which another site cannot make it send with a form, so
the cookie is the console's whole defence against cross-site posts), the fields of a posted
form, and the VM its path names."""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, Request

from keeper_api.auth import CONSOLE_COOKIE
from keeper_api.problems import ProblemError
from keeper_api.resolving import resolve
from keeper_api.state import ApiState, api_state
from keeper_api.tokens import Caller
from keeper_shared.messages.types import VM_NAME_PATTERN


class LoginNeededError(Exception):
    """No valid console token: back to the login page."""


def console_caller(request: Request) -> Caller:
    token = request.cookies.get(CONSOLE_COOKIE)
    found = api_state(request).tokens.caller(token) if token else None
    if found is None:
        raise LoginNeededError
    return found


Who = Annotated[Caller, Depends(console_caller)]
State = Annotated[ApiState, Depends(api_state)]


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of a posted form (application/x-www-form-urlencoded, all the console's
    forms send), first value of each; read here rather than through python-multipart,
    which only file uploads would need."""
    fields = parse_qs((await request.body()).decode("utf-8", errors="replace"))
    return {name: values[0] for name, values in fields.items() if values}


async def vm_id_of(state: ApiState, vm: str) -> str:
    """The VM id a console path names (id or name), refused as the API refuses it."""
    if not re.fullmatch(VM_NAME_PATTERN, vm):
        raise ProblemError(f"{vm!r} is not a VM id or name", status=422, reason="usage")
    return await resolve(state.keeper, vm)
