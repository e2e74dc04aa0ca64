"""Long operations (start, stop, restore, revert, clone, import, export): accepted with 202
and an operation resource to poll, their outcome kept in Redis under ``keeper:api:
operation:<id>`` (the API's own Redis user may touch nothing else), so whichever replica a
poll reaches answers it.

The replica carrying an operation out renews a liveness key beside it every
``operation_heartbeat_s``; an operation still ``running`` whose key lapsed (three heartbeats
missed: the replica was killed or lost Redis) is reported ``interrupted``, as is one a
stopping replica could not see to its end. Interrupted means the outcome is unknown: what
had been sent goes on server side, and the VM's state says how it ended."""

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
from keeper_shared.keeper_client.outcomes import ExitCode

OPERATION_KEY_PREFIX = "keeper:api:operation:"
"""Every key the API writes starts with this (its Redis ACL user is limited to it)."""

log = structlog.get_logger(__name__)


class OperationStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    """Its replica stopped before the reply came; the command may still be carried out."""


HEARTBEATS_MISSED = 3
"""Liveness keys outlive this many heartbeats, so a slow renewal is not taken for a death."""

INTERRUPTED_PROBLEM = ProblemError(
    "the API replica carrying out this operation stopped before its reply came; the command "
    "may still be carried out server side: follow the VM's state",
    ExitCode.TIMEOUT,
).problem()


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


def alive_key(operation_id: str) -> str:
    """Exists while a replica carries the operation out (under the API's own prefix)."""
    return f"{operation_key(operation_id)}:alive"


async def save(state: ApiState, operation: Operation) -> None:
    await state.redis.set(
        operation_key(operation.id),
        operation.model_dump_json(),
        ex=state.settings.operation_ttl_s,
    )


async def load(state: ApiState, operation_id: str) -> Operation | None:
    """The operation as recorded; one recorded running whose replica stopped renewing its
    liveness key is reported interrupted."""
    raw = await state.redis.get(operation_key(operation_id))
    if raw is None:
        return None
    operation = Operation.model_validate_json(raw)
    if operation.status is OperationStatus.RUNNING and not await state.redis.exists(
        alive_key(operation_id)
    ):
        return interrupted(operation)
    return operation


def interrupted(operation: Operation) -> Operation:
    return operation.model_copy(
        update={"status": OperationStatus.INTERRUPTED, "problem": INTERRUPTED_PROBLEM}
    )


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
    await _renew(state, operation.id)
    task = asyncio.create_task(_carry_out(state, operation, work), name=f"operation {kind}")
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    return operation


async def _renew(state: ApiState, operation_id: str) -> None:
    heartbeat_s = state.settings.operation_heartbeat_s
    await state.redis.set(
        alive_key(operation_id), "1", px=int(heartbeat_s * HEARTBEATS_MISSED * 1000)
    )


async def _keep_alive(state: ApiState, operation_id: str) -> None:
    while True:
        await asyncio.sleep(state.settings.operation_heartbeat_s)
        try:
            await _renew(state, operation_id)
        except Exception as error:  # Redis away for a moment: the next beat tries again
            log.warning("operation liveness not renewed", operation=operation_id, error=str(error))


async def _carry_out(state: ApiState, operation: Operation, work: Work) -> None:
    alive = asyncio.create_task(_keep_alive(state, operation.id), name="operation liveness")
    try:
        await _outcome(state, operation, work)
    finally:
        alive.cancel()
        await asyncio.gather(alive, return_exceptions=True)
    await state.redis.delete(alive_key(operation.id))


async def _outcome(state: ApiState, operation: Operation, work: Work) -> None:
    """Carry the operation out and record how it ended; cancelled (the replica stops), it
    is recorded interrupted before the cancellation goes on."""
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
    except asyncio.CancelledError:
        await save(state, interrupted(operation))
        raise
    except Exception:
        log.exception("operation failed unexpectedly", operation=operation.id)
        problem = ProblemError("internal error", status=500, reason="internal").problem()
        done = operation.model_copy(update={"status": OperationStatus.FAILED, "problem": problem})
    done.finished_at = time.time()
    await save(state, done)
