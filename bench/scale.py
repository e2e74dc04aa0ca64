"""Scale: the real store against many simulated hosts.

What is real: the state-store process, RabbitMQ, Redis, every message (``state.changed``
published under each host's routing key with its state sealed inline, and for what does not
go inline a ``state.fetch`` sent by the store to each host's own quorum queue and the
``state.fetched`` reply with real compressed blobs). What is simulated: the hosts. Each
simulated host batches its announcements and inlines their state with the agent's own
`ChangeAnnouncer` and `StateInliner`; one bench-only responder in this process consumes the
command queues of all simulated host ids and answers fetches with the blob it announced
last, so 100 hosts do not need 100 host-agent processes on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractExchange
from redis.asyncio import Redis

from bench.env import PersistedRecorder
from keeper_host_agent.detect.announcer import ChangeAnnouncer
from keeper_host_agent.detect.inline_state import InlineBudget, StateInliner
from keeper_shared.bus.client import BusClient, Delivery, Route
from keeper_shared.bus.topology import (
    COMMANDS_EXCHANGE,
    QueueSpec,
    declare_exchanges,
    event_routing_key,
    host_command_key,
    host_command_queue,
)
from keeper_shared.messages.envelope import Envelope, encode, new_envelope
from keeper_shared.messages.state import (
    FetchState,
    SealedVmState,
    StateChange,
    StateChanged,
    StateFetched,
)
from keeper_shared.messages.types import FencingToken, StateBlob, StateKind
from keeper_shared.redis_access.keys import placement_key
from keeper_shared.sealing.keys import SealingPublicKey
from keeper_shared.sealing.state_blobs import seal_state_blob

WAIT_S = 30.0


@dataclass(frozen=True)
class FakeVm:
    """A VM on a simulated host."""

    vm_id: str
    host: str


@dataclass
class FakeHosts:
    """The responder for every simulated host, and the announcer of their changes."""

    bus: BusClient
    events: AbstractExchange
    pools: dict[StateKind, list[StateBlob]]
    store_key: SealingPublicKey
    """What fetch replies and inline state are sealed to, as an agent does."""
    inline: InlineBudget
    """The agent's inline budget (zero: every change hash-only and fetched, as before)."""
    current: dict[tuple[str, StateKind], StateBlob] = field(default_factory=dict)
    steps: dict[tuple[str, StateKind], int] = field(default_factory=dict)
    generation: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    fetches: int = 0
    events_published: int = 0
    changes_published: int = 0
    """``state.changed`` events published and the changes they carried: how many versions
    share one event's per-message costs (the broker's, aio-pika's, the store's)."""
    announcers: dict[str, ChangeAnnouncer] = field(default_factory=dict)
    """Per simulated host, the agent's own batching of announcements."""

    @classmethod
    async def start(
        cls,
        bus: BusClient,
        pools: dict[StateKind, list[StateBlob]],
        store_key: SealingPublicKey,
        inline: InlineBudget,
    ) -> FakeHosts:
        """Ready to serve hosts added with ``serve``."""
        channel = await bus.connection.channel(publisher_confirms=True)
        events, _ = await declare_exchanges(channel)
        return cls(bus, events, pools, store_key, inline)

    async def serve(self, host_ids: Sequence[str]) -> None:
        """Consume these hosts' command queues."""
        for host_id in host_ids:
            await self.bus.consume(
                host_command_queue(host_id), [Route(FetchState, self.fetch)], prefetch=8
            )

    async def serve_fleet(self, name: str, host_ids: Sequence[str]) -> None:
        """Take these hosts' commands from one bench queue bound to every host's command
        key: a thousand hosts without the broker keeping two thousand quorum queues (each
        host's queue and its dead-letter queue) on a 2-core machine. The store sends each
        fetch under its host's own key exactly as to a real host; only the broker's side
        of a fleet (a queue per host) is left out."""
        spec = QueueSpec(name=f"bench.fleet.{name}", command_key=host_command_key(host_ids[0]))
        await self.bus.consume(spec, [Route(FetchState, self.fetch)], prefetch=256)
        channel = await self.bus.connection.channel()
        try:
            queue = await channel.get_queue(spec.name, ensure=True)
            for host_id in host_ids[1:]:
                await queue.bind(COMMANDS_EXCHANGE, routing_key=host_command_key(host_id))
        finally:
            await channel.close()

    async def fetch(self, envelope: Envelope[FetchState], _delivery: Delivery) -> StateFetched:
        """What a host agent answers: the current blob of each asked VM and kind."""
        self.fetches += 1
        found = []
        for vm_id in envelope.data.vm_ids:
            blobs = [
                seal_state_blob(vm_id, self.current[(vm_id, kind)], self.store_key)
                for kind in envelope.data.kinds
                if (vm_id, kind) in self.current
            ]
            found.append(SealedVmState(vm_id=vm_id, blobs=blobs))
        return StateFetched(vms=found)

    async def change(self, vm: FakeVm, kind: StateKind) -> StateBlob:
        """The VM's state changes to its next variant; announce it as its host would."""
        blob = self.write(vm, kind)
        await self.announce_current(vm, kind)
        return blob

    def write(self, vm: FakeVm, kind: StateKind) -> StateBlob:
        """The VM's state changes to its next variant on its host (not announced yet)."""
        step = self.steps.get((vm.vm_id, kind), 0)
        self.steps[(vm.vm_id, kind)] = step + 1
        pool = self.pools[kind]
        token = FencingToken(epoch=1, generation=next(self.generation))
        blob = pool[step % len(pool)].model_copy(update={"token": token})
        self.current[(vm.vm_id, kind)] = blob
        return blob

    async def announce_current(self, vm: FakeVm, kind: StateKind) -> None:
        """Announce the VM's current state as its host would; return once confirmed."""
        blob = self.current[(vm.vm_id, kind)]
        announcer = self.announcers.get(vm.host)
        if announcer is None:
            announcer = ChangeAnnouncer(
                vm.host,
                functools.partial(self._publish, vm.host),
                StateInliner(self.store_key, self.inline),
            )
            self.announcers[vm.host] = announcer
        await announcer.announce(
            StateChange(
                vm_id=vm.vm_id,
                kind=kind,
                content_hash=blob.content_hash,
                size=blob.size,
                token=blob.token,
            ),
            blob,
        )

    async def _publish(self, host: str, event: StateChanged) -> None:
        """Publish under the host's routing key, as its agent would."""
        self.events_published += 1
        self.changes_published += len(event.changes)
        envelope = new_envelope(event, source=f"host-agent/{host}", subject=host)
        await self.events.publish(
            aio_pika.Message(
                encode(envelope),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(envelope.id),
                type=envelope.type,
            ),
            routing_key=event_routing_key(StateChanged.message_type, host),
        )

    async def close(self) -> None:
        """Stop the hosts' announcers."""
        for announcer in self.announcers.values():
            await announcer.close()


async def place(redis: Redis, vms: Sequence[FakeVm]) -> None:
    """What policy writes when it places a VM: its host and epoch."""
    async with redis.pipeline(transaction=False) as pipe:
        for vm in vms:
            pipe.hset(placement_key(vm.vm_id), mapping={"host": vm.host, "epoch": "1"})
        await pipe.execute()


@dataclass(frozen=True)
class LoopResult:
    """What one closed loop did."""

    persisted_in_time: int
    """Versions persisted within the measured duration (the throughput's numerator)."""
    seconds: float
    timeouts: int
    persisted: int
    """Every version persisted, also those in flight at the end that landed after it: what
    Redis holds once the loop returns, so the divisor of memory per version."""


async def closed_loop(
    hosts: FakeHosts,
    recorder: PersistedRecorder,
    vms: Sequence[FakeVm],
    kinds: Sequence[StateKind],
    *,
    duration_s: float | None,
    steps: int | None = None,
    warmup_s: float = 0.0,
) -> LoopResult:
    """Each VM changes (cycling through ``kinds``) as soon as its last change was persisted,
    for ``warmup_s`` and then ``duration_s``, or ``steps`` changes each; returns once every
    change in flight has been persisted or timed out. Only versions persisted after the
    warm-up count: a thousand VMs that start together land in waves at first, and a window
    shorter than a few of those waves measures their phase, not the rate."""
    began = time.monotonic()
    counts_from = began + warmup_s
    ends = counts_from + duration_s if duration_s is not None else float("inf")
    done = 0
    persisted = 0
    timeouts = 0

    async def one(vm: FakeVm, offset: int) -> None:
        nonlocal done, persisted, timeouts
        step = 0
        while time.monotonic() < ends and (steps is None or step < steps):
            kind = kinds[(offset + step) % len(kinds)]
            step += 1
            blob = await hosts.change(vm, kind)
            future = recorder.expect(vm.vm_id, blob.content_hash)
            try:
                at = await asyncio.wait_for(future, WAIT_S)
            except TimeoutError:
                timeouts += 1
                recorder.forget(vm.vm_id, blob.content_hash)
                continue
            persisted += 1
            if counts_from <= at < ends:
                done += 1

    await asyncio.gather(*(one(vm, index) for index, vm in enumerate(vms)))
    elapsed = (duration_s if duration_s is not None else time.monotonic() - began) or 1e-9
    return LoopResult(done, elapsed, timeouts, persisted)


async def used_memory(redis: Redis) -> int:
    """Redis INFO memory used_memory."""
    info = await redis.info("memory")
    return int(info["used_memory"])
