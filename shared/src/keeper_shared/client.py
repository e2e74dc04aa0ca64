"""A client of vTPM Keeper for people and automation: ask policy, watch the events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from keeper_shared.bus.client import BusClient
from keeper_shared.bus.topology import EVENTS_EXCHANGE, POLICY
from keeper_shared.messages.commands import CommandDone
from keeper_shared.messages.envelope import Envelope, MessageError, Payload, decode, peek_type
from keeper_shared.messages.placement import PlaceVm, StopMode, StopVm
from keeper_shared.messages.tpm import EnableTpm, VmSpec

E = TypeVar("E", bound=Payload)


class KeeperRequestError(RuntimeError):
    """Policy refused or could not carry out a request; the message says why."""


class EventWatch:
    """Events seen since the watch began, to wait for one that matches."""

    def __init__(self) -> None:
        self._bodies: list[bytes] = []
        self._arrived = asyncio.Condition()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with self._arrived:
            self._bodies.append(message.body)
            self._arrived.notify_all()

    async def wait_for(
        self, event_type: type[E], matches: Callable[[E], bool], timeout_s: float
    ) -> Envelope[E]:
        """The first event of ``event_type`` (seen before or after the call) that matches."""
        seen = 0

        def find() -> Envelope[E] | None:
            nonlocal seen
            for body in self._bodies[seen:]:
                seen += 1
                try:
                    if peek_type(body) != event_type.message_type:
                        continue
                    envelope = decode(body, event_type)
                except MessageError:
                    continue
                if matches(envelope.data):
                    return envelope
            return None

        async with asyncio.timeout(timeout_s), self._arrived:
            while (found := find()) is None:
                await self._arrived.wait()
            return found


class KeeperClient:
    """Requests to policy, and a view of the events."""

    def __init__(self, bus: BusClient, *, request_timeout_s: float) -> None:
        self._bus = bus
        self._timeout = request_timeout_s
        self._watch_queue: AbstractQueue | None = None

    @classmethod
    async def connect(
        cls, amqp_url: str, *, name: str, request_timeout_s: float = 120.0
    ) -> KeeperClient:
        """Connect as a client named ``name``."""
        bus = await BusClient.connect(amqp_url, source=f"client/{name}", origin="client")
        return cls(bus, request_timeout_s=request_timeout_s)

    async def close(self) -> None:
        """Disconnect."""
        await self._bus.close()

    async def watch_events(self, *patterns: str) -> EventWatch:
        """Start collecting events whose routing key matches any of ``patterns``."""
        watch = EventWatch()
        channel = await self._bus.connection.channel()
        queue = await channel.declare_queue(
            f"keeper.watch.{uuid.uuid4().hex[:12]}", exclusive=True, auto_delete=True
        )
        for pattern in patterns:
            await queue.bind(EVENTS_EXCHANGE, routing_key=pattern)
        await queue.consume(watch.on_message, no_ack=True)
        return watch

    async def _ask_policy(self, payload: Payload, subject: str) -> dict[str, Any]:
        reply = await self._bus.call(
            POLICY, payload, CommandDone, subject=subject, timeout_s=self._timeout
        )
        if not reply.data.ok:
            raise KeeperRequestError(reply.data.error or "refused without a reason")
        return dict(reply.data.detail)

    async def enable_tpm(self, spec: VmSpec, *, override: bool = False) -> str:
        """Register a VM with a TPM; returns the approved `<tpm>` element."""
        detail = await self._ask_policy(EnableTpm(spec=spec, override=override), spec.vm_id)
        return str(detail["tpm_xml"])

    async def start(self, vm_id: str, host: str) -> int:
        """Start a VM on ``host`` with its newest state; returns the new placement epoch."""
        detail = await self._ask_policy(PlaceVm(vm_id=vm_id, host=host), vm_id)
        return int(detail["epoch"])

    async def stop(self, vm_id: str, mode: StopMode) -> bool:
        """Stop a VM, keeping its final state; True when that state was retrieved."""
        detail = await self._ask_policy(StopVm(vm_id=vm_id, mode=mode), vm_id)
        return detail.get("retrieved") == "true"
