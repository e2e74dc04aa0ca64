"""The FastAPI application: the API's routes, the console, problem details for every
failure, and the body size limit."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from keeper_api import other_routes, problems, vm_routes
from keeper_api.body_limit import BodyLimit
from keeper_api.console import pages
from keeper_api.failures import BUS_FAILURES, as_problem
from keeper_api.settings import ApiSettings
from keeper_api.state import lifespan

TITLE = "vTPM Keeper API"
VERSION = "1"


async def _on_failure(request: Request, error: Exception) -> Response:
    """A refusal or a bus failure: a page on the console, a problem detail elsewhere."""
    page = await pages.console_failure(request, error)
    if page is not None:
        return page
    if isinstance(error, problems.ProblemError):
        return problems.problem_response(error)
    changes = request.method not in ("GET", "HEAD")
    return problems.problem_response(as_problem(error, changes=changes))


def create_app(settings: ApiSettings | None) -> FastAPI:
    """The app; ``settings`` None builds it only for its OpenAPI document."""
    app = FastAPI(
        title=TITLE,
        version=VERSION,
        description=(
            "vTPM Keeper over HTTP: the `keeper` CLI's requests to policy and the state "
            "store. Bearer tokens (roles reader and operator); failures are RFC 9457 "
            "problem details whose `reason` and `exit_code` are the CLI's; long operations "
            "answer 202 with an operation to poll."
        ),
        lifespan=lifespan if settings is not None else None,
    )
    app.state.settings = settings
    for router in (
        other_routes.health,
        vm_routes.router,
        other_routes.hosts,
        other_routes.templates,
        other_routes.polls,
    ):
        app.include_router(router)
    pages.mount(app)
    app.add_exception_handler(problems.ProblemError, _on_failure)
    app.add_exception_handler(RequestValidationError, problems.on_validation)
    app.add_exception_handler(StarletteHTTPException, problems.on_http)
    for failure in BUS_FAILURES:
        app.add_exception_handler(failure, _on_failure)
    app.add_exception_handler(Exception, problems.on_unexpected)
    if settings is not None:
        app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
