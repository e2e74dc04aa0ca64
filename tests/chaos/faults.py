"""The faults a chaos run injects, one at a time, each followed by its recovery.

Each `FaultKind` is done for real to real processes: SIGKILL of a host agent, a store or a
policy replica (then started again); a broker restart (then every service queue must have
its consumers back); a Redis SIGKILL and restart from its append-only file; a host cut off
from the broker and healed (see `HostLink`: its network link down, the agent running on);
a Redis reply lost right after a store's fenced write (the write happened, the store cannot
know, and retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from enum import StrEnum

import aio_pika

from chaos.backend import ChaosBackend
from chaos.harness import STARTUP_TIMEOUT_S, ChaosCluster
from chaos.netns import HostLink
from chaos.tcp_proxy import TcpProxy
from keeper_devtools.demo.processes import ServiceProcess
from keeper_shared.bus.topology import (
    POLICY_COMMANDS,
    POLICY_EVENTS,
    STATE_STORE_COMMANDS,
    STATE_STORE_EVENTS,
    host_command_queue,
)
from support.waiting import WaitTimeoutError, wait_until

CONSUMERS_BACK_TIMEOUT_S = 90.0
"""Generous: a service that never resumes consuming fails the run, a slow one does not."""
REPLY_DROP_TIMEOUT_S = 30.0
CHANNEL_TIMEOUT_S = 5.0
FENCED_WRITE_MARKER = b"EVALSHA"
"""The store's fenced write is a Lua script run by its SHA (see the store's repository)."""


class FaultKind(StrEnum):
    """What was done, as the table names it."""

    HOST_KILL = "host agent SIGKILL + restart"
    STORE_KILL = "store replica SIGKILL + restart"
    POLICY_KILL = "policy replica SIGKILL + restart"
    BROKER_RESTART = "RabbitMQ restart"
    REDIS_RESTART = "Redis SIGKILL + restart"
    HOST_CUT = "host cut off from the broker + healed"
    REPLY_DROP = "Redis reply lost after a write"


@dataclass(frozen=True)
class InjectedFault:
    """One fault: what, to whom, when it began and when the victim was back."""

    kind: FaultKind
    target: str
    at: float
    back_at: float
    """For a host kill: when the agent was started again (until then it served nothing)."""
    recovery_s: float | None = None
    """Broker restart: how long until every service queue had its consumers again. Redis
    restart: how long until a write could be made durable again (the restarted server
    answers; with replicas, it is back as the new primary's replica)."""

    @property
    def recovered_at(self) -> float:
        """When the system could do its work again: the awaited recovery, else ``back_at``."""
        return self.at + self.recovery_s if self.recovery_s is not None else self.back_at


class FaultsNotRecoveredError(RuntimeError):
    """The system did not come back from a fault in time."""


@dataclass
class Timing:
    """How long victims stay down and cut off (random within the bounds)."""

    down_s: tuple[float, float] = (0.5, 1.5)
    cut_s: tuple[float, float] = (2.0, 4.0)


class FaultInjector:
    """Injects faults into a running `ChaosCluster` and its backend, and waits for recovery."""

    def __init__(
        self,
        cluster: ChaosCluster,
        backend: ChaosBackend,
        *,
        host_links: list[HostLink],
        store_redis_proxies: list[TcpProxy],
        timing: Timing,
        rng: random.Random,
    ) -> None:
        self._cluster = cluster
        self._backend = backend
        self._host_links = host_links
        self._store_redis_proxies = store_redis_proxies
        self._timing = timing
        self._rng = rng
        self.injected: list[InjectedFault] = []

    async def inject(self, kind: FaultKind) -> InjectedFault:
        """Do ``kind`` once and wait until the system is back; remember it."""
        handlers = {
            FaultKind.HOST_KILL: lambda: self._kill(self._cluster.agents, kind, wait_ready=True),
            FaultKind.STORE_KILL: lambda: self._kill(self._cluster.stores, kind, wait_ready=False),
            FaultKind.POLICY_KILL: lambda: self._kill(
                self._cluster.policies, kind, wait_ready=False
            ),
            FaultKind.BROKER_RESTART: self._restart_broker,
            FaultKind.REDIS_RESTART: self._restart_redis,
            FaultKind.HOST_CUT: self._cut_host,
            FaultKind.REPLY_DROP: self._drop_reply,
        }
        fault = await handlers[kind]()
        self.injected.append(fault)
        return fault

    async def _kill(
        self, victims: list[ServiceProcess], kind: FaultKind, *, wait_ready: bool
    ) -> InjectedFault:
        victim = self._rng.choice(victims)
        at = time.time()
        await self._cluster.kill(victim)
        await asyncio.sleep(self._rng.uniform(*self._timing.down_s))
        back_at = time.time()
        await self._cluster.restart(victim)
        # A replica may still be starting when the next fault (a Redis or broker outage)
        # hits: it must wait that out. A host agent is waited for, so that each host kill's
        # recovery point is judged on its own.
        if wait_ready:
            await self._cluster.wait_ready([victim], STARTUP_TIMEOUT_S)
        return InjectedFault(kind, victim.name, at, back_at)

    async def _restart_broker(self) -> InjectedFault:
        at = time.time()
        await asyncio.to_thread(self._backend.restart_broker)
        back_at = time.time()
        try:
            waited = await wait_until(
                self._consumers_back,
                "every service queue's consumers",
                CONSUMERS_BACK_TIMEOUT_S,
                poll_s=0.5,
            )
        except WaitTimeoutError as error:
            raise FaultsNotRecoveredError(
                f"after a broker restart: {error}; missing: {await self._missing_consumers()}"
            ) from error
        return InjectedFault(FaultKind.BROKER_RESTART, "broker", at, back_at, back_at - at + waited)

    async def _consumers_back(self) -> bool:
        self._cluster.check_running()
        return not await self._missing_consumers()

    async def _missing_consumers(self) -> list[str]:
        """Queues with fewer consumers than the services that should consume them."""
        cluster = self._cluster
        expected = {
            STATE_STORE_EVENTS.name: len(cluster.stores),
            STATE_STORE_COMMANDS.name: len(cluster.stores),
            POLICY_EVENTS.name: len(cluster.policies),
            POLICY_COMMANDS.name: len(cluster.policies),
            **{host_command_queue(host.host_id).name: 1 for host in cluster.hosts},
        }
        missing = []
        for queue, count in expected.items():
            found = await self._consumer_count(queue)
            if found is None or found < count:
                missing.append(f"{queue} ({found} of {count})")
        return missing

    async def _consumer_count(self, queue: str) -> int | None:
        """Consumers on ``queue`` now; None while the broker cannot be asked."""
        try:
            channel = await asyncio.wait_for(
                self._cluster.recorder.connection.channel(), CHANNEL_TIMEOUT_S
            )
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError):
            return None  # the harness's own connection is still reconnecting
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.consumer_count or 0)
        except (aio_pika.exceptions.AMQPError, ConnectionError):
            return None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _restart_redis(self) -> InjectedFault:
        at = time.time()
        await asyncio.to_thread(self._backend.kill_redis)
        await asyncio.sleep(self._rng.uniform(*self._timing.down_s))
        back_at = time.time()
        await asyncio.to_thread(self._backend.start_redis)
        recovered_s = time.time() - at
        return InjectedFault(FaultKind.REDIS_RESTART, "redis", at, back_at, recovered_s)

    async def _cut_host(self) -> InjectedFault:
        index = self._rng.randrange(len(self._host_links))
        link = self._host_links[index]
        at = time.time()
        await asyncio.to_thread(link.cut)
        await asyncio.sleep(self._rng.uniform(*self._timing.cut_s))
        await asyncio.to_thread(link.heal)
        return InjectedFault(FaultKind.HOST_CUT, self._cluster.agents[index].name, at, time.time())

    async def _drop_reply(self) -> InjectedFault:
        index = self._rng.randrange(len(self._store_redis_proxies))
        proxy = self._store_redis_proxies[index]
        dropped_before = proxy.replies_dropped
        at = time.time()
        proxy.drop_reply_after(FENCED_WRITE_MARKER)

        async def dropped() -> bool:
            return proxy.replies_dropped > dropped_before

        try:
            await wait_until(dropped, "a store write whose reply to lose", REPLY_DROP_TIMEOUT_S)
        except WaitTimeoutError as error:
            raise FaultsNotRecoveredError(
                f"store-{index + 1} made no write to lose a reply of: {error}"
            ) from error
        return InjectedFault(FaultKind.REPLY_DROP, f"store-{index + 1}", at, time.time())
