"""Emptying the shared service queues between tests that run whole stacks.

The broker is the session's: an earlier test's hosts (dead by now) may have left events
whose pulls would time out one by one ahead of the next test's.
"""

from __future__ import annotations

from keeper_shared.bus.client import BusClient
from keeper_shared.bus.topology import (
    POLICY_COMMANDS,
    POLICY_EVENTS,
    STATE_STORE_COMMANDS,
    STATE_STORE_EVENTS,
    declare_queue,
)


async def purge_service_queues(amqp_url: str) -> None:
    """Drop every message waiting in the store's and policy's queues."""
    bus = await BusClient.connect(amqp_url, source="test/purge", origin="test")
    try:
        channel = await bus.connection.channel()
        for spec in (STATE_STORE_EVENTS, STATE_STORE_COMMANDS, POLICY_EVENTS, POLICY_COMMANDS):
            queue = await declare_queue(channel, spec)
            await queue.purge()
        await channel.close()
    finally:
        await bus.close()
