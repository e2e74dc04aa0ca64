"""Workflows in Redis: at most one per VM, its progress, and the lease of the replica
running it.

A workflow is a hash (``keeper:{vm}:workflow``) with its kind, current step, attempts and
what the steps learnt; a replica runs it only while it holds the lease
(``keeper:{vm}:workflow-lease``, SET NX PX, renewed while it works). Progress is written
with a script that checks the lease, so a replica that lost it cannot overwrite the new
owner. When a replica dies its lease expires and another one resumes at the recorded step.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from redis.asyncio import Redis

from keeper_policy.storage.keys import (
    WORKFLOWS_INDEX,
    workflow_key,
    workflow_lease_key,
    workflow_result_key,
)
from keeper_policy.storage.scripts import PolicyScripts
from keeper_shared.messages.commands import CommandOutcome, ReplyT
from keeper_shared.redis_access.results import awaited

RESULT_TTL_S = 3600
"""How long a finished workflow's outcome is kept for a redelivered request to find."""

INDEX_GRACE_S = 60.0
"""An index entry without a workflow is dropped only once this old: the entry is written
just before its workflow, and the sweep must not drop it in between."""


@dataclass(frozen=True)
class WorkflowRecord:
    """One VM's workflow as stored."""

    id: str
    vm_id: str
    kind: str
    step: str
    host: str
    created_at: float
    deadline: float
    attempts: int = 0
    data: dict[str, str] = field(default_factory=dict)
    """What the steps recorded (trigger, epoch, retrieved, ...); strings, as Redis keeps them."""

    @classmethod
    def new(
        cls, vm_id: str, kind: str, step: str, host: str, bound_s: float, **data: str
    ) -> WorkflowRecord:
        """A fresh workflow that should be over within ``bound_s``."""
        now = time.time()
        return cls(
            id=uuid.uuid4().hex,
            vm_id=vm_id,
            kind=kind,
            step=step,
            host=host,
            created_at=now,
            deadline=now + bound_s,
            data=dict(data),
        )

    def to_fields(self) -> dict[str, str]:
        """The hash fields."""
        return {
            "id": self.id,
            "vm_id": self.vm_id,
            "kind": self.kind,
            "step": self.step,
            "host": self.host,
            "created_at": repr(self.created_at),
            "deadline": repr(self.deadline),
            "attempts": str(self.attempts),
            **{f"data.{key}": value for key, value in self.data.items()},
        }

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> WorkflowRecord:
        """Parse the hash fields."""
        text = {key.decode(): value.decode() for key, value in raw.items()}
        return cls(
            id=text["id"],
            vm_id=text["vm_id"],
            kind=text["kind"],
            step=text["step"],
            host=text["host"],
            created_at=float(text["created_at"]),
            deadline=float(text["deadline"]),
            attempts=int(text.get("attempts", "0")),
            data={key[5:]: value for key, value in text.items() if key.startswith("data.")},
        )

    def advanced(
        self,
        *,
        step: str | None = None,
        attempts: int | None = None,
        data: Mapping[str, str] | None = None,
    ) -> WorkflowRecord:
        """This record with a new step, attempt count or more data."""
        return replace(
            self,
            step=self.step if step is None else step,
            attempts=self.attempts if attempts is None else attempts,
            data={**self.data, **(data or {})},
        )


_UNTYPED = ""
"""The reply type of a result kept before results were typed."""


@dataclass(frozen=True)
class WorkflowResult:
    """How a finished workflow ended: the reply its requester is told (a ``vm.place``,
    ``vm.stop`` or ``vm.snapshot`` reply), kept as that reply's type and fields so any
    replica can answer a redelivered request with it."""

    reply_type: str
    """The reply's message type."""
    fields: Mapping[str, Any]
    """The reply's fields as JSON values."""

    @classmethod
    def of(cls, reply: CommandOutcome) -> WorkflowResult:
        """The result that answers with ``reply``."""
        return cls(reply.message_type, reply.model_dump(mode="json"))

    @property
    def ok(self) -> bool:
        """Whether the workflow did what it was asked."""
        return bool(self.fields.get("ok"))

    def reply(self, reply_type: type[ReplyT]) -> ReplyT:
        """The reply as ``reply_type``; a result of another kind is an error (a bug)."""
        if self.reply_type not in (reply_type.message_type, _UNTYPED):
            raise TypeError(f"a {self.reply_type} result read as {reply_type.message_type}")
        return reply_type.model_validate(self.fields)

    def to_json(self) -> str:
        """Serialised for Redis."""
        return json.dumps({"type": self.reply_type, "reply": dict(self.fields)})

    @classmethod
    def from_json(cls, text: bytes) -> WorkflowResult:
        """Parse what :meth:`to_json` wrote."""
        data = json.loads(text)
        if "type" not in data:
            # Kept by a replica of the previous version (ok, error and a string map): its
            # outcome still answers, without the facts it wrote as strings.
            return cls(_UNTYPED, {"ok": bool(data["ok"]), "error": data.get("error")})
        return cls(reply_type=str(data["type"]), fields=dict(data["reply"]))


class WorkflowStore:
    """Redis access for workflows and their leases."""

    def __init__(self, redis: Redis, scripts: PolicyScripts) -> None:
        self._redis = redis
        self._scripts = scripts

    async def create(self, record: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        """Store ``record`` unless the VM has a workflow; returns the VM's workflow and
        whether it is the new one."""
        # Index first: a crash between the two leaves an entry without a workflow (dropped
        # by the sweep), never a workflow nobody can find.
        await awaited(self._redis.zadd(WORKFLOWS_INDEX, {record.vm_id: record.created_at}))
        args: list[str] = []
        for key, value in record.to_fields().items():
            args += [key, value]
        existing = await self._scripts.workflow_create(keys=[workflow_key(record.vm_id)], args=args)
        if not existing:
            return record, True
        pairs = dict(zip(existing[::2], existing[1::2], strict=True))
        return WorkflowRecord.from_fields(pairs), False

    async def load(self, vm_id: str) -> WorkflowRecord | None:
        """The VM's workflow in progress, if any."""
        raw = await awaited(self._redis.hgetall(workflow_key(vm_id)))
        return WorkflowRecord.from_fields(raw) if raw else None

    async def acquire(self, vm_id: str, owner: str, lease_s: float) -> bool:
        """Take the VM's workflow lease if nobody holds it."""
        taken = await self._redis.set(
            workflow_lease_key(vm_id), owner, nx=True, px=int(lease_s * 1000)
        )
        return bool(taken)

    async def renew(self, vm_id: str, owner: str, lease_s: float) -> bool:
        """Extend a lease ``owner`` holds; False when it lost it."""
        renewed = await self._scripts.lease_renew(
            keys=[workflow_lease_key(vm_id)], args=[owner, int(lease_s * 1000)]
        )
        return bool(renewed)

    async def release(self, vm_id: str, owner: str) -> None:
        """Give the lease up, if ``owner`` holds it."""
        await self._scripts.lease_release(keys=[workflow_lease_key(vm_id)], args=[owner])

    async def save(self, record: WorkflowRecord, owner: str) -> bool:
        """Write ``record``'s progress while ``owner`` holds the lease; False otherwise."""
        args: list[str] = [owner, record.id]
        for key, value in record.to_fields().items():
            args += [key, value]
        saved = await self._scripts.workflow_advance(
            keys=[workflow_key(record.vm_id), workflow_lease_key(record.vm_id)], args=args
        )
        return bool(saved)

    async def finish(self, record: WorkflowRecord, owner: str, result: WorkflowResult) -> bool:
        """Remove the finished workflow, keep its result, release the lease."""
        kept = json.dumps({"id": record.id, **json.loads(result.to_json())})
        finished = await self._scripts.workflow_finish(
            keys=[
                workflow_key(record.vm_id),
                workflow_lease_key(record.vm_id),
                workflow_result_key(record.vm_id),
            ],
            args=[owner, record.id, kept, RESULT_TTL_S],
        )
        if finished:
            await self._drop_index(record.vm_id, record.created_at)
        return bool(finished)

    async def result(self, vm_id: str, workflow_id: str) -> WorkflowResult | None:
        """The result of the VM's finished workflow ``workflow_id``, if still kept."""
        raw = await self._redis.get(workflow_result_key(vm_id))
        if raw is None or json.loads(raw).get("id") != workflow_id:
            return None
        return WorkflowResult.from_json(raw)

    async def pending(self) -> list[tuple[str, float]]:
        """(VM id, creation time) of every indexed workflow, oldest first."""
        entries = await awaited(self._redis.zrange(WORKFLOWS_INDEX, 0, -1, withscores=True))
        return [(vm_id.decode(), float(score)) for vm_id, score in entries]

    async def drop_stale_index(self, vm_id: str, created_at: float) -> None:
        """Forget an index entry whose workflow is gone, once it is old enough."""
        if time.time() - created_at > INDEX_GRACE_S and await self.load(vm_id) is None:
            await self._drop_index(vm_id, created_at)

    async def _drop_index(self, vm_id: str, created_at: float) -> None:
        await self._scripts.index_drop(keys=[WORKFLOWS_INDEX], args=[vm_id, repr(created_at)])
