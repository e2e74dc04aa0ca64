"""An event whose broker confirm never comes fails after a bound instead of hanging its
caller (and every announcement queued behind it) forever."""

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


class ConfirmNeverComes:
    """An exchange whose publish is never confirmed (a reconnect lost it)."""

    def __init__(self) -> None:
        self.published = 0

    async def publish(self, *_args: Any, **_kwargs: Any) -> None:
        self.published += 1
        await asyncio.Event().wait()


async def test_an_unconfirmed_event_raises_after_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bus_client, "EVENT_CONFIRM_TIMEOUT_S", 0.05)
    bus = BusClient(
        cast(AbstractRobustConnection, object()), source="test", origin="h1", user_id="h1"
    )
    exchange = ConfirmNeverComes()
    bus._events = cast(AbstractExchange, exchange)
    started = VmStarted(vm_id="0b8f3c2e-4d1a-4e6b-9a7c-2f5d8e1b3c4a", host="h1", name="vm")

    publishing = asyncio.create_task(bus.publish_event(started, subject=started.vm_id))
    await asyncio.wait({publishing}, timeout=HANG_GUARD_S)
    assert publishing.done(), "publish_event still waits for the confirm"
    assert isinstance(publishing.exception(), TimeoutError)
    assert exchange.published == 1
