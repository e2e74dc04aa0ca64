"""`ChangeAdmission`: at most its capacity of changes in flight, first come first served,
an event larger than the gate still admitted, and a cancelled waiter neither leaks room
nor blocks those behind it."""

from __future__ import annotations

import asyncio

import pytest

from keeper_state_store.handlers.admission import ChangeAdmission


async def test_changes_beyond_the_capacity_wait_for_room() -> None:
    gate = ChangeAdmission(10)
    order: list[str] = []
    release_first = asyncio.Event()

    async def event(name: str, changes: int, hold: asyncio.Event | None = None) -> None:
        async with gate.admit(changes):
            order.append(name)
            if hold is not None:
                await hold.wait()

    first = asyncio.create_task(event("first", 8, release_first))
    await asyncio.sleep(0)
    second = asyncio.create_task(event("second", 5))
    third = asyncio.create_task(event("third", 1))  # would fit, but comes after second
    await asyncio.sleep(0.01)
    assert order == ["first"]
    assert gate.in_flight == 8

    release_first.set()
    await asyncio.gather(first, second, third)
    assert order == ["first", "second", "third"]
    assert gate.in_flight == 0


async def test_an_event_larger_than_the_gate_takes_all_of_it() -> None:
    gate = ChangeAdmission(4)
    async with gate.admit(100):
        assert gate.in_flight == 4
    assert gate.in_flight == 0


async def test_a_cancelled_waiter_frees_the_queue_behind_it() -> None:
    gate = ChangeAdmission(4)
    held = asyncio.Event()
    admitted: list[str] = []

    async def holder() -> None:
        async with gate.admit(3):
            await held.wait()

    async def waiter(name: str, changes: int) -> None:
        async with gate.admit(changes):
            admitted.append(name)

    holding = asyncio.create_task(holder())
    await asyncio.sleep(0)
    big = asyncio.create_task(waiter("big", 4))
    small = asyncio.create_task(waiter("small", 1))
    await asyncio.sleep(0.01)
    assert admitted == []  # small waits behind big (first come, first served)

    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    await asyncio.wait_for(small, 5)
    assert admitted == ["small"]

    held.set()
    await holding
    assert gate.in_flight == 0


async def test_nothing_to_admit_never_waits_in_the_queue() -> None:
    gate = ChangeAdmission(1)
    held = asyncio.Event()

    async def holder() -> None:
        async with gate.admit(1):
            await held.wait()

    holding = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(holder())  # queued behind the first
    await asyncio.sleep(0)

    async with asyncio.timeout(5):
        async with gate.admit(0):
            assert gate.in_flight == 1

    held.set()
    await asyncio.gather(holding, waiting)


async def test_a_failing_block_gives_its_room_back() -> None:
    gate = ChangeAdmission(2)
    with pytest.raises(RuntimeError):
        async with gate.admit(2):
            raise RuntimeError("write failed")
    assert gate.in_flight == 0


def test_a_gate_must_hold_something() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ChangeAdmission(0)
