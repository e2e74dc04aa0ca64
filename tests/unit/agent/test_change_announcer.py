"""Stable changes are announced in batches: one ``state.changed`` per flush of the host's
changes, each caller answered for its own change; a v1 event (one change) is still read."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from keeper_host_agent.detect.announcer import ChangeAnnouncer
from keeper_shared.messages.envelope import decode, encode, new_envelope
from keeper_shared.messages.state import MAX_VMS_PER_MESSAGE, StateChange, StateChanged
from keeper_shared.messages.types import FencingToken, StateKind

HOST = "host-a"


def _change(generation: int = 1) -> StateChange:
    return StateChange(
        vm_id=str(uuid.uuid4()),
        kind=StateKind.TPM,
        content_hash="ab" * 32,
        size=16384,
        token=FencingToken(epoch=1, generation=generation),
    )


class SlowBroker:
    """Records every event; each confirm arrives only when the test releases it."""

    def __init__(self) -> None:
        self.published: list[StateChanged] = []
        self.confirm = asyncio.Event()
        self.fail_with: Exception | None = None

    async def publish(self, event: StateChanged) -> None:
        self.published.append(event)
        await self.confirm.wait()
        if self.fail_with is not None:
            raise self.fail_with


async def test_changes_found_together_go_in_one_event() -> None:
    broker = SlowBroker()
    broker.confirm.set()
    announcer = ChangeAnnouncer(HOST, broker.publish)
    changes = [_change() for _ in range(5)]

    await asyncio.gather(*(announcer.announce(change) for change in changes))

    assert len(broker.published) == 1
    assert broker.published[0].host == HOST
    assert broker.published[0].changes == changes


async def test_changes_found_while_one_event_is_on_its_way_share_the_next() -> None:
    broker = SlowBroker()
    announcer = ChangeAnnouncer(HOST, broker.publish)
    first = asyncio.create_task(announcer.announce(_change()))
    await asyncio.sleep(0.01)
    later = [asyncio.create_task(announcer.announce(_change())) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert len(broker.published) == 1
    assert not first.done(), "answered before the broker confirmed"

    broker.confirm.set()
    await asyncio.gather(first, *later)

    assert [len(event.changes) for event in broker.published] == [1, 3]


async def test_an_event_never_exceeds_the_message_limit() -> None:
    broker = SlowBroker()
    broker.confirm.set()
    announcer = ChangeAnnouncer(HOST, broker.publish)

    await asyncio.gather(*(announcer.announce(_change()) for _ in range(MAX_VMS_PER_MESSAGE + 1)))

    assert [len(event.changes) for event in broker.published] == [MAX_VMS_PER_MESSAGE, 1]


async def test_a_failed_publish_is_raised_to_every_caller_of_its_batch() -> None:
    broker = SlowBroker()
    broker.fail_with = ConnectionError("broker gone")
    broker.confirm.set()
    announcer = ChangeAnnouncer(HOST, broker.publish)

    outcomes = await asyncio.gather(
        *(announcer.announce(_change()) for _ in range(3)), return_exceptions=True
    )

    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    broker.fail_with = None
    await announcer.announce(_change())  # the next change is announced again
    assert len(broker.published) == 2


async def test_closing_cancels_changes_still_waiting() -> None:
    broker = SlowBroker()
    announcer = ChangeAnnouncer(HOST, broker.publish)
    waiting = [asyncio.create_task(announcer.announce(_change())) for _ in range(2)]
    await asyncio.sleep(0.01)

    await announcer.close()

    for task in waiting:
        with pytest.raises(asyncio.CancelledError):
            await task


def test_a_version_1_event_is_read_as_one_change() -> None:
    change = _change(generation=7)
    body = json.loads(
        encode(new_envelope(StateChanged(host=HOST, changes=[change]), source="t", subject=HOST))
    )
    body["schema_version"] = 1
    body["data"] = {"host": HOST, **change.model_dump(mode="json", exclude={"sealed"})}

    event = decode(json.dumps(body).encode(), StateChanged).data

    assert event.host == HOST
    assert event.changes == [change]
