"""An event whose broker confirm never comes fails after a bound instead of hanging its
caller (and every announcement queued behind it) forever; a caller that asks for more
attempts has it published again first."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractExchange, AbstractRobustConnection

from keeper_shared.bus import client as bus_client
from keeper_shared.bus.client import BusClient
from keeper_shared.messages.vm import VmStarted

HANG_GUARD_S = 30.0
"""Generous: only tells a bound that works from a publish that waits for ever."""


STARTED = VmStarted(vm_id="0b8f3c2e-4d1a-4e6b-9a7c-2f5d8e1b3c4a", host="h1", name="vm")


class ConfirmComesLate:
    """An exchange whose first ``lost`` publishes are never confirmed (a reconnect lost
    them, or the broker is far behind); later ones are."""

    def __init__(self, lost: int) -> None:
        self.lost = lost
        self.published = 0

    async def publish(self, *_args: Any, **_kwargs: Any) -> None:
        self.published += 1
        if self.published <= self.lost:
            await asyncio.Event().wait()


def bus_with(exchange: ConfirmComesLate, monkeypatch: pytest.MonkeyPatch) -> BusClient:
    monkeypatch.setattr(bus_client, "EVENT_CONFIRM_TIMEOUT_S", 0.05)
    bus = BusClient(
        cast(AbstractRobustConnection, object()), source="test", origin="h1", user_id="h1"
    )
    bus._events = cast(AbstractExchange, exchange)
    return bus


async def test_an_unconfirmed_event_raises_after_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exchange = ConfirmComesLate(lost=1_000)
    bus = bus_with(exchange, monkeypatch)

    publishing = asyncio.create_task(bus.publish_event(STARTED, subject=STARTED.vm_id))
    await asyncio.wait({publishing}, timeout=HANG_GUARD_S)
    assert publishing.done(), "publish_event still waits for the confirm"
    assert isinstance(publishing.exception(), TimeoutError)
    assert exchange.published == 1


async def test_more_attempts_publish_again_until_one_is_confirmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exchange = ConfirmComesLate(lost=2)
    bus = bus_with(exchange, monkeypatch)

    envelope = await asyncio.wait_for(
        bus.publish_event(STARTED, subject=STARTED.vm_id, attempts=3), HANG_GUARD_S
    )

    assert envelope.data == STARTED
    assert exchange.published == 3


async def test_every_attempt_unconfirmed_raises_after_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exchange = ConfirmComesLate(lost=1_000)
    bus = bus_with(exchange, monkeypatch)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            bus.publish_event(STARTED, subject=STARTED.vm_id, attempts=3), HANG_GUARD_S
        )
    assert exchange.published == 3
