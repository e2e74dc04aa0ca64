"""A finished workflow's result as Redis keeps it: the typed reply its requester is told,
read back as that type only, and a result kept by the previous version still answers."""

from __future__ import annotations

import json

import pytest

from keeper_policy.workflows.store import WorkflowResult
from keeper_shared.messages.placement import StopTrigger
from keeper_shared.messages.replies import PlaceVmReply, StopVmReply
from keeper_shared.messages.types import StateKind


def test_a_result_reads_back_as_the_reply_it_was() -> None:
    reply = PlaceVmReply(ok=True, epoch=4, versions={StateKind.TPM: 3}, tpm_secret_uuid=None)
    kept = WorkflowResult.from_json(WorkflowResult.of(reply).to_json().encode())
    assert kept.ok
    assert kept.reply(PlaceVmReply) == reply


def test_a_result_is_not_read_as_another_commands_reply() -> None:
    stopped = WorkflowResult.of(
        StopVmReply(ok=True, was_running=True, trigger=StopTrigger.SHUTDOWN)
    )
    with pytest.raises(TypeError, match=r"vm\.stop\.reply result read as vm\.place\.reply"):
        stopped.reply(PlaceVmReply)


def test_a_result_of_the_previous_version_keeps_its_outcome() -> None:
    legacy = json.dumps({"id": "w1", "ok": False, "error": "start failed", "detail": {}})
    reply = WorkflowResult.from_json(legacy.encode()).reply(PlaceVmReply)
    assert (reply.ok, reply.error, reply.epoch) == (False, "start failed", None)
