"""RFC 9457 problem details: every failure the API answers with, its reason the CLI's
(:class:`~keeper_shared.keeper_client.outcomes.ExitCode` label and code), its HTTP status
from :data:`STATUS`."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from keeper_shared.keeper_client.outcomes import ExitCode

PROBLEM_JSON = "application/problem+json"

STATUS = {
    ExitCode.REFUSED: 409,
    ExitCode.USAGE: 422,
    ExitCode.UNKNOWN_VM: 404,
    ExitCode.UNREACHABLE: 503,
    ExitCode.ABORTED: 409,
    ExitCode.TIMEOUT: 504,
    ExitCode.DENIED: 502,
    ExitCode.INTERRUPTED: 503,
}
"""The HTTP status of each CLI exit reason. ``denied`` is the broker refusing the API
itself (a gateway's failure, 502); a caller's own lack of rights is 401/403 (``auth``)."""


class Problem(BaseModel):
    """A problem detail (RFC 9457), with the CLI's reason and exit code as extensions."""

    type: str = Field(description="A URI naming the reason: urn:keeper:problem:<reason>.")
    title: str
    status: int
    detail: str
    reason: str = Field(description="The CLI's reason label (refused, unknown-vm, ...).")
    exit_code: int | None = Field(description="What `keeper` would exit with; None: HTTP only.")


class ProblemError(Exception):
    """Ends a request with a problem detail."""

    def __init__(
        self,
        detail: str,
        code: ExitCode | None = None,
        *,
        status: int | None = None,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.status = status if status is not None else STATUS[code] if code else 500
        self.reason = reason or (code.label if code is not None else "error")
        self.headers = headers or {}

    def problem(self) -> Problem:
        return Problem(
            type=f"urn:keeper:problem:{self.reason}",
            title=self.reason.replace("-", " "),
            status=self.status,
            detail=self.detail,
            reason=self.reason,
            exit_code=int(self.code) if self.code is not None else None,
        )


def problem_response(error: ProblemError) -> JSONResponse:
    return JSONResponse(
        error.problem().model_dump(),
        status_code=error.status,
        media_type=PROBLEM_JSON,
        headers=error.headers,
    )


def describe_validation(errors: list[Any]) -> str:
    """The fields and rules a request broke, as the CLI names an option and its rule."""
    parts = []
    for error in errors[:5]:
        where = ".".join(str(item) for item in error.get("loc", ()) if item != "body")
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


async def on_validation(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    detail = describe_validation(list(error.errors()))
    return problem_response(ProblemError(detail, ExitCode.USAGE))


async def on_http(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    reason = {404: "not-found", 405: "method-not-allowed"}.get(error.status_code, "http")
    return problem_response(
        ProblemError(str(error.detail), status=error.status_code, reason=reason)
    )


async def on_unexpected(_request: Request, _error: Exception) -> JSONResponse:
    """Anything else: a problem detail without the traceback (which goes to the log)."""
    return problem_response(
        ProblemError("internal error; the API's log has the details", status=500, reason="internal")
    )
