"""An event whose broker confirm never comes fails after a bound instead of hanging its
caller (and every announcement queued behind it) forever."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractExchange, AbstractRobustConnection

from keeper_shared.bus import client as bus_client
from keeper_shared.bus.client import BusClient
from keeper_shared.messages.vm import VmStarted


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

    began = time.monotonic()
    with pytest.raises(TimeoutError):  # the bound's, not the test's own (after 5 s)
        await asyncio.wait_for(bus.publish_event(started, subject=started.vm_id), timeout=5.0)
    assert time.monotonic() - began < 2.0
    assert exchange.published == 1
