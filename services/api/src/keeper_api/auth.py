"""Who is calling: a bearer token (``Authorization: Bearer ...``) or, for the console, the
same token kept in an HttpOnly, SameSite=Strict cookie after the login form. Every route
but ``/health`` needs one; changing anything needs the operator role."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from keeper_api.problems import ProblemError
from keeper_api.state import api_state
from keeper_api.tokens import Caller, Role

CONSOLE_COOKIE = "keeper_console_token"


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(CONSOLE_COOKIE)


def caller(request: Request) -> Caller:
    """The caller, or 401 with a ``WWW-Authenticate`` challenge."""
    token = _token(request)
    found = api_state(request).tokens.caller(token) if token else None
    if found is None:
        raise ProblemError(
            "a valid bearer token is needed (Authorization: Bearer TOKEN)",
            status=401,
            reason="unauthenticated",
            headers={"WWW-Authenticate": 'Bearer realm="keeper"'},
        )
    return found


def operator(found: Annotated[Caller, Depends(caller)]) -> Caller:
    """The caller when it may change things, else 403."""
    if found.role is not Role.OPERATOR:
        raise ProblemError(
            f"{found.name} has the reader role: it may look, not change anything",
            status=403,
            reason="forbidden",
        )
    return found


Reader = Annotated[Caller, Depends(caller)]
Operator = Annotated[Caller, Depends(operator)]
