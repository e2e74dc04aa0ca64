"""The snapshot-with-memory workflow's steps against a scripted gateway (no I/O): the order
pause -> retrieve -> pin -> libvirt snapshot -> resume, a failure at any step still resumes
the VM, and every loop is bounded."""

from __future__ import annotations

from typing import cast

import pytest
from redis.asyncio import Redis

from keeper_policy.gateway import Gateway
from keeper_policy.snapshot.memory_records import MemorySnapshot, MemorySnapshots
from keeper_policy.snapshot.workflow import SnapshotRunner, new_memory_snapshot
from keeper_policy.stop.plan import StopBounds
from keeper_policy.workflows.store import WorkflowRecord, WorkflowResult
from keeper_shared.bus.client import BusClient
from keeper_shared.messages.commands import ReplyT
from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.replies import (
    CreateSnapshotReply,
    RetrieveStateReply,
    SnapshotDomainReply,
    SnapshotVmReply,
)
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm_snapshot import SnapshotMode, VmSnapshotted

VM_ID = "6b2f7e0a-3c1d-4d6e-9a8b-1c2d3e4f5a6b"
PINNED = {StateKind.TPM: 3, StateKind.NVRAM: 2}
BOUNDS = StopBounds(retrieve_attempts=3, retrieve_timeout_s=1.0, host_command_timeout_s=1.0)


class ScriptedGateway(Gateway):
    """Answers every command at once; the types in ``failing`` fail."""

    def __init__(self, failing: set[str]) -> None:
        super().__init__(cast(BusClient, None), retrieve_timeout_s=1, host_command_timeout_s=1)
        self.failing = failing
        self.sent: list[str] = []
        self.published: list[Payload] = []

    def _answer(self, kind: str, reply_type: type[ReplyT]) -> ReplyT:
        self.sent.append(kind)
        if kind in self.failing:
            return reply_type.failed(f"{kind} refused")
        if reply_type is CreateSnapshotReply:
            return reply_type.model_validate({"ok": True, "versions": PINNED})
        if reply_type is SnapshotDomainReply:
            return reply_type.model_validate(
                {"ok": True, "changed": True, "snapshot_xml": SNAPSHOT_XML}
            )
        return reply_type(ok=True)

    async def host(
        self,
        host: str,
        payload: Payload,
        reply_type: type[ReplyT],
        vm_id: str,
        timeout_s: float | None = None,
    ) -> ReplyT:
        return self._answer(payload.message_type, reply_type)

    async def call(
        self,
        target: str,
        payload: Payload,
        reply_type: type[ReplyT],
        vm_id: str,
        timeout_s: float,
    ) -> ReplyT:
        return self._answer(payload.message_type, reply_type)

    async def retrieve(self, vm_id: str, host: str) -> RetrieveStateReply:
        return self._answer("state.retrieve", RetrieveStateReply)

    async def publish(self, payload: Payload, subject: str) -> None:
        self.published.append(payload)


class KeptSnapshots(MemorySnapshots):
    """The records in a dict."""

    def __init__(self) -> None:
        super().__init__(cast(Redis, None))
        self.kept: dict[tuple[str, str], MemorySnapshot] = {}

    async def save(self, vm_id: str, snapshot: MemorySnapshot) -> None:
        self.kept[(vm_id, snapshot.snapshot_id)] = snapshot


async def run(gateway: ScriptedGateway, kept: KeptSnapshots | None = None) -> WorkflowResult:
    runner = SnapshotRunner(gateway, BOUNDS, kept or KeptSnapshots())
    record = new_memory_snapshot(VM_ID, "host-a", "snap-1", BOUNDS)

    async def save(_progress: WorkflowRecord) -> bool:
        return True

    for _ in range(50):
        outcome = await runner.step(record, save)
        if outcome.result is not None:
            return outcome.result
        record = outcome.record
    pytest.fail("the snapshot workflow did not end")


PAUSE, RETRIEVE, PIN = "vm.suspend", "state.retrieve", "snapshot.create"
SNAPSHOT, RESUME = "vm.snapshot-domain", "vm.resume"
SNAPSHOT_XML = "<domainsnapshot><name>snap-1</name></domainsnapshot>"


async def test_state_is_retrieved_and_pinned_while_paused() -> None:
    gateway = ScriptedGateway(failing=set())
    kept = KeptSnapshots()
    result = await run(gateway, kept)
    assert result.ok
    assert gateway.sent == [PAUSE, RETRIEVE, PIN, SNAPSHOT, RESUME]
    reply = result.reply(SnapshotVmReply)
    assert (reply.mode, reply.versions) == (SnapshotMode.MEMORY, PINNED)
    (event,) = gateway.published
    assert isinstance(event, VmSnapshotted)
    # What a revert after an undefine needs: the host with the memory, libvirt's XML.
    assert kept.kept == {
        (VM_ID, "snap-1"): MemorySnapshot(
            snapshot_id="snap-1", host="host-a", snapshot_xml=SNAPSHOT_XML
        )
    }


@pytest.mark.parametrize(
    ("failing", "sent", "error"),
    [
        ({PAUSE}, [PAUSE, RESUME], "pause failed"),
        ({RETRIEVE}, [PAUSE, RETRIEVE, RETRIEVE, RETRIEVE, RESUME], "could not be retrieved"),
        ({PIN}, [PAUSE, RETRIEVE, PIN, RESUME], "pinning the state failed"),
        ({SNAPSHOT}, [PAUSE, RETRIEVE, PIN, SNAPSHOT, RESUME], "the libvirt snapshot failed"),
        ({RESUME}, [PAUSE, RETRIEVE, PIN, SNAPSHOT, RESUME, RESUME, RESUME], "is paused on"),
    ],
)
async def test_every_failure_still_resumes_the_vm(
    failing: set[str], sent: list[str], error: str
) -> None:
    gateway = ScriptedGateway(failing=failing)
    kept = KeptSnapshots()
    result = await run(gateway, kept)
    reply = result.reply(SnapshotVmReply)
    assert not reply.ok
    assert reply.error is not None
    assert error in reply.error
    assert gateway.sent == sent
    assert gateway.published == []
    assert kept.kept == {}, "a failed snapshot leaves nothing to revert to"
