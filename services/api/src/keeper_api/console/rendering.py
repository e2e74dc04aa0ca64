"""The console's templates and how every page is answered: a page, or a refusal that
says why (a reader's change, a problem the API would answer)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from keeper_api.tokens import Caller, Role

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")


def ago(seconds: float | None) -> str:
    """A duration as the console shows ages: ``3 min ago``, ``never``."""
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _when(stamp: datetime | float | None) -> str:
    if stamp is None:
        return "-"
    moment = stamp if isinstance(stamp, datetime) else datetime.fromtimestamp(stamp, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


templates.env.filters["ago"] = ago
templates.env.filters["when"] = _when


def page(request: Request, name: str, http_status: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=http_status)


def refusal(request: Request, who: Caller | None, status: int, message: str) -> HTMLResponse:
    return page(request, "refused.html", status, who=who, message=message)


def reader_refusal(request: Request, who: Caller) -> HTMLResponse | None:
    """The refusal of a change asked by a reader, or None for an operator: every form
    that changes something asks this first, before reading its fields."""
    if who.role is Role.OPERATOR:
        return None
    return refusal(request, who, 403, f"{who.name} has the reader role: no changes")
