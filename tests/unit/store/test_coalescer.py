"""The store's group commit across hosts (`keeper_state_store.handlers.coalescer`) with
a fake pipeline.

What the store relies on: groups ready together (from any host) share one call; groups
that arrive while calls are in flight share the next one; each caller gets exactly its own
results in its own order, or the call's error; one call never carries the same key twice
nor more than its item limit (a single larger group still goes whole); a key on its way in
one call holds back its later groups, in order, and no other; items without keys (reads)
always join; a shared call logs under no one event's context.
"""

from __future__ import annotations

import asyncio

import pytest
import structlog

from keeper_state_store.handlers.coalescer import Coalescer


class FakeWriteAll:
    """Records every call; takes ``delay_s``; answers each item with ``(item, call index)``."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[list[tuple[str, str]]] = []
        self.error: Exception | None = None

    async def __call__(self, items: list[tuple[str, str]]) -> list[tuple[tuple[str, str], int]]:
        index = len(self.calls)
        self.calls.append(list(items))
        error = self.error  # as it was when the call began
        await asyncio.sleep(self.delay_s)
        if error is not None:
            raise error
        return [(item, index) for item in items]


def coalescer(
    write_all: FakeWriteAll, *, max_items: int = 100, max_in_flight: int = 1, keyed: bool = True
) -> Coalescer[tuple[str, str], tuple[tuple[str, str], int]]:
    return Coalescer(
        write_all,
        (lambda item: item) if keyed else None,
        max_items=max_items,
        max_in_flight=max_in_flight,
    )


async def test_groups_ready_together_share_one_call_and_get_their_own_results() -> None:
    write_all = FakeWriteAll()
    writer = coalescer(write_all)

    results = await asyncio.gather(
        *(writer.call([(f"vm-{host}-{i}", "tpm") for i in range(2)]) for host in range(50))
    )

    assert len(write_all.calls) == 1
    assert len(write_all.calls[0]) == 100
    for host, mine in enumerate(results):
        assert [item for item, _ in mine] == [(f"vm-{host}-{i}", "tpm") for i in range(2)]


async def test_groups_arriving_during_a_call_share_the_next_one() -> None:
    write_all = FakeWriteAll(delay_s=0.05)
    writer = coalescer(write_all)

    first = asyncio.create_task(writer.call([("vm-0", "tpm")]))
    await asyncio.sleep(0.01)  # the first call is on its way
    later = [asyncio.create_task(writer.call([(f"vm-{i}", "nvram")])) for i in range(1, 11)]
    await asyncio.gather(first, *later)

    assert [len(call) for call in write_all.calls] == [1, 10]
    assert all(task.result()[0][1] == 1 for task in later)


async def test_a_call_never_writes_one_key_twice_nor_more_than_its_limit() -> None:
    write_all = FakeWriteAll()
    writer = coalescer(write_all, max_items=3, max_in_flight=4)

    await asyncio.gather(
        writer.call([("vm-a", "tpm")]),
        writer.call([("vm-a", "tpm")]),  # same VM and kind: the next call
        writer.call([("vm-b", "tpm"), ("vm-c", "tpm")]),
        writer.call([("vm-d", "tpm")]),  # over the limit: the next call
        writer.call([(f"vm-big-{i}", "tpm") for i in range(5)]),  # larger than the limit
    )

    for call in write_all.calls:
        assert len(call) == len(set(call))
        assert len(call) <= 3 or all(item[0].startswith("vm-big") for item in call)
    assert sorted(item for call in write_all.calls for item in call) == sorted(
        [("vm-a", "tpm"), ("vm-a", "tpm"), ("vm-b", "tpm"), ("vm-c", "tpm"), ("vm-d", "tpm")]
        + [(f"vm-big-{i}", "tpm") for i in range(5)]
    )


async def test_a_key_on_its_way_holds_back_its_later_groups_in_order_and_no_other() -> None:
    # Two calls may fly at once; were the second allowed the first's key, whichever landed
    # first would win, and an older write that lands last is refused as stale.
    write_all = FakeWriteAll(delay_s=0.05)
    writer = coalescer(write_all, max_in_flight=2)

    first = asyncio.create_task(writer.call([("vm-a", "tpm")]))
    await asyncio.sleep(0.01)  # the first call is on its way, a slot is free
    again = asyncio.create_task(writer.call([("vm-a", "tpm")]))
    other = asyncio.create_task(writer.call([("vm-b", "tpm")]))
    after = asyncio.create_task(writer.call([("vm-a", "tpm"), ("vm-c", "tpm")]))
    await asyncio.sleep(0.02)  # the second call is on its way too

    assert write_all.calls == [[("vm-a", "tpm")], [("vm-b", "tpm")]]
    await asyncio.gather(first, again, other, after)
    assert write_all.calls[2:] == [[("vm-a", "tpm")], [("vm-a", "tpm"), ("vm-c", "tpm")]]
    assert [task.result()[0][1] for task in (first, other, again, after)] == [0, 1, 2, 3]


async def test_a_failed_call_fails_every_group_it_carried_and_no_other() -> None:
    write_all = FakeWriteAll(delay_s=0.02)
    writer = coalescer(write_all)
    write_all.error = ConnectionError("redis went away")

    together = [asyncio.create_task(writer.call([(f"vm-{i}", "tpm")])) for i in range(3)]
    await asyncio.sleep(0.01)
    write_all.error = None
    after = asyncio.create_task(writer.call([("vm-late", "tpm")]))

    for task in together:
        with pytest.raises(ConnectionError):
            await task
    assert [item for item, _ in await after] == [("vm-late", "tpm")]


async def test_close_cancels_what_waits_and_what_is_written() -> None:
    write_all = FakeWriteAll(delay_s=10.0)
    writer = coalescer(write_all)

    flying = asyncio.create_task(writer.call([("vm-0", "tpm")]))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(writer.call([("vm-1", "tpm")]))
    await asyncio.sleep(0.01)
    await writer.close()

    await asyncio.wait([flying, waiting], timeout=5)
    assert flying.cancelled()
    assert waiting.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await writer.call([("vm-2", "tpm")])


async def test_nothing_to_write_costs_no_call() -> None:
    write_all = FakeWriteAll()
    assert await coalescer(write_all).call([]) == []
    assert write_all.calls == []


async def test_items_without_keys_share_a_call_even_when_equal() -> None:
    read_all = FakeWriteAll()
    reader = coalescer(read_all, keyed=False)

    results = await asyncio.gather(*(reader.call([("vm-a", "tpm")]) for _ in range(5)))

    assert len(read_all.calls) == 1
    assert results == [[(("vm-a", "tpm"), 0)]] * 5


async def test_a_shared_call_runs_outside_the_context_of_the_event_that_started_it() -> None:
    seen: list[dict[str, object]] = []

    async def call_all(items: list[str]) -> list[str]:
        seen.append(structlog.contextvars.get_contextvars())
        return items

    shared: Coalescer[str, str] = Coalescer(call_all, None, max_items=10, max_in_flight=1)
    structlog.contextvars.bind_contextvars(subject="vm-of-one-event")
    try:
        assert await shared.call(["x"]) == ["x"]
    finally:
        structlog.contextvars.clear_contextvars()

    assert seen == [{}]
