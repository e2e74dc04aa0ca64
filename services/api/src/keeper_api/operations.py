"""Long operations (start, stop, restore, revert, clone, import, export): accepted with 202
and an operation resource to poll, their outcome kept in Redis under ``keeper:api:
operation:<id>`` (the API's own Redis user may touch nothing else), so whichever replica a
poll reaches answers it. A replica that dies while one runs leaves it ``running`` until its
record expires; what it had sent goes on server side (the VM's state says how it ended)."""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from pydantic import BaseModel, Field

from keeper_api.failures import BUS_FAILURES, as_problem
from keeper_api.problems import Problem, ProblemError
from keeper_api.state import ApiState

OPERATION_KEY_PREFIX = "keeper:api:operation:"
"""Every key the API writes starts with this (its Redis ACL user is limited to it)."""

log = structlog.get_logger(__name__)


class OperationStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Operation(BaseModel):
    """A long operation as any replica reports it."""

    id: str
    kind: str = Field(description="What was asked: vm.start, vm.shutdown, vm.clone, ...")
    vm_id: str | None
    requested_by: str
    status: OperationStatus
    created_at: float
    finished_at: float | None = None
    result: dict[str, Any] | None = Field(default=None, description="The reply, once done.")
    problem: Problem | None = Field(default=None, description="Why it failed, once failed.")


def operation_key(operation_id: str) -> str:
    return f"{OPERATION_KEY_PREFIX}{operation_id}"


async def save(state: ApiState, operation: Operation) -> None:
    await state.redis.set(
        operation_key(operation.id),
        operation.model_dump_json(),
        ex=state.settings.operation_ttl_s,
    )


async def load(state: ApiState, operation_id: str) -> Operation | None:
    raw = await state.redis.get(operation_key(operation_id))
    return None if raw is None else Operation.model_validate_json(raw)


Work = Callable[[], Awaitable[dict[str, Any]]]


async def start(
    state: ApiState, kind: str, vm_id: str | None, requested_by: str, work: Work
) -> Operation:
    """Record the operation as running and carry it out in the background."""
    operation = Operation(
        id=str(uuid.uuid4()),
        kind=kind,
        vm_id=vm_id,
        requested_by=requested_by,
        status=OperationStatus.RUNNING,
        created_at=time.time(),
    )
    await save(state, operation)
    task = asyncio.create_task(_carry_out(state, operation, work), name=f"operation {kind}")
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    return operation


async def _carry_out(state: ApiState, operation: Operation, work: Work) -> None:
    try:
        result = await work()
        done = operation.model_copy(update={"status": OperationStatus.SUCCEEDED, "result": result})
    except ProblemError as error:
        done = operation.model_copy(
            update={"status": OperationStatus.FAILED, "problem": error.problem()}
        )
    except BUS_FAILURES as error:
        problem = as_problem(error, changes=True).problem()
        done = operation.model_copy(update={"status": OperationStatus.FAILED, "problem": problem})
    except Exception:
        log.exception("operation failed unexpectedly", operation=operation.id)
        problem = ProblemError("internal error", status=500, reason="internal").problem()
        done = operation.model_copy(update={"status": OperationStatus.FAILED, "problem": problem})
    done.finished_at = time.time()
    await save(state, done)
