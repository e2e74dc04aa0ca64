"""The bench's own servers and services: a private RabbitMQ node and Redis on free ports in a
temp dir, real state-store and host-agent processes, and a recorder of persisted events."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aio_pika
import redis
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from keeper_devtools.demo.processes import ServiceProcess
from keeper_devtools.localstack import (
    RabbitMQConfig,
    RabbitMQNode,
    RedisConfig,
    RedisServer,
    free_tcp_ports,
)
from keeper_host_agent.detect.inline_state import DEFAULT_EVENT_BYTES
from keeper_shared.bus.topology import EVENTS_EXCHANGE, declare_exchanges
from keeper_shared.messages.envelope import MessageError, decode, peek_type
from keeper_shared.messages.state import StatePersisted
from keeper_shared.sealing.keys import SealingPublicKey, load_private_key


@dataclass
class Stack:
    """A private RabbitMQ node and Redis server, stopped by ``close``."""

    base: Path
    rabbit: RabbitMQNode
    redis: RedisServer

    @classmethod
    @contextlib.contextmanager
    def running(cls, base: Path) -> Iterator[Stack]:
        """Start both servers on free ports under ``base``; stop them on exit."""
        amqp, dist, epmd, redis_port = free_tcp_ports(4)
        rabbit_dir = base / "rabbitmq"
        rabbit = RabbitMQNode(
            RabbitMQConfig(
                name=f"bench{uuid.uuid4().hex[:6]}",
                amqp_port=amqp,
                dist_port=dist,
                epmd_port=epmd,
                base_dir=rabbit_dir,
            )
        )
        redis_server = RedisServer(RedisConfig(port=redis_port, base_dir=base / "redis"))
        stack = cls(base, rabbit, redis_server)
        try:
            redis_server.start()
            rabbit.start()
            yield stack
        finally:
            with contextlib.suppress(Exception):
                rabbit.stop()
            with contextlib.suppress(Exception):
                redis_server.stop()

    def versions(self) -> dict[str, str]:
        """Versions of Python, RabbitMQ (asked of the node) and Redis (INFO server)."""
        found = {"python": platform.python_version(), "cpus": str(os.cpu_count())}
        found["cpu_model"] = _cpu_model()
        client = redis.Redis.from_url(self.redis.url)
        try:
            info = cast(dict[str, Any], client.info("server"))
            found["redis"] = str(info.get("redis_version", "?"))
        finally:
            client.close()
        found["rabbitmq"] = self._rabbit_version()
        return found

    def _rabbit_version(self) -> str:
        try:
            result = self.rabbit._ctl("version", timeout=30)
        except Exception:  # the version is worth a line, not a failed run
            result = None
        if result is not None and result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[-1]
        dpkg = shutil.which("dpkg-query")
        if dpkg:
            out = subprocess.run(
                [dpkg, "-W", "-f=${Version}", "rabbitmq-server"],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode == 0:
                return f"{out.stdout.strip()} (dpkg)"
        return "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
        for line in text.splitlines():
            if line.startswith("model name"):
                return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    return platform.processor() or "?"


def store_sealing_key_file(work: Path) -> Path:
    """The store's sealing key of a bench run (made with its KEK)."""
    return work / "keys" / "store-sealing.key"


def store_process(stack: Stack, work: Path, kek: Path, *, history_depth: int) -> ServiceProcess:
    """The real state store (one replica)."""
    return ServiceProcess(
        "store-1",
        "keeper_state_store",
        {
            "KEEPER_STORE_AMQP_URL": stack.rabbit.amqp_url,
            "KEEPER_STORE_REDIS_URL": stack.redis.url,
            "KEEPER_STORE_KEK_FILE": str(kek),
            "KEEPER_STORE_SEALING_KEY_FILE": str(store_sealing_key_file(work)),
            "KEEPER_STORE_REPLICA_ID": "bench-store-1",
            "KEEPER_STORE_HISTORY_DEPTH": str(history_depth),
            # Bench TPM contents are random bytes no swtpm can load; the rest of the scrubber
            # runs at its default rate as in production.
            "KEEPER_STORE_SCRUB_SWTPM": "false",
            # Every bench client shares the node's one AMQP user (as on the demo stack), so
            # the per-host user check is off; it is one string comparison per message.
            "KEEPER_STORE_VERIFY_HOST_IDENTITY": "false",
            "KEEPER_STORE_LOG_JSON": "true",
            "KEEPER_STORE_SHUTDOWN_GRACE_S": "5",
        },
        work / "logs" / "store-1.log",
    )


def agent_process(
    stack: Stack,
    work: Path,
    host_id: str,
    root: Path,
    *,
    window_s: float,
    rescan_s: float = 5.0,
    heartbeat_s: float = 5.0,
    inline: bool = True,
) -> ServiceProcess:
    """The real host agent of one simulated host (a libvirt test:/// node file), with the
    opt-in inline state on; without ``inline`` it announces every change by its hash alone
    (each version is fetched), the agent's default."""
    store_key = SealingPublicKey(load_private_key(store_sealing_key_file(work)).public_key())
    return ServiceProcess(
        host_id,
        "keeper_host_agent",
        {
            "KEEPER_HOST_HOST_ID": host_id,
            "KEEPER_HOST_AMQP_URL": stack.rabbit.amqp_url,
            "KEEPER_HOST_LIBVIRT_URI": f"test://{root / 'libvirt-node.xml'}",
            "KEEPER_HOST_SWTPM_ROOT": str(root / "swtpm"),
            "KEEPER_HOST_NVRAM_DIR": str(root / "nvram"),
            "KEEPER_HOST_SEALING_KEY_FILE": str(root / "sealing.key"),
            "KEEPER_HOST_STORE_SEALING_KEY": store_key.to_text(),
            "KEEPER_HOST_STABILITY_WINDOW_S": str(window_s),
            "KEEPER_HOST_RESCAN_INTERVAL_S": str(rescan_s),
            "KEEPER_HOST_HEARTBEAT_INTERVAL_S": str(heartbeat_s),
            "KEEPER_HOST_LOG_JSON": "true",
            "KEEPER_HOST_SHUTDOWN_GRACE_S": "5",
            # Inline state is the agent's opt-in; the bench measures it unless told not to.
            **({"KEEPER_HOST_INLINE_STATE_MAX_BYTES": str(DEFAULT_EVENT_BYTES)} if inline else {}),
        },
        work / "logs" / f"{host_id}.log",
    )


async def start_service(service: ServiceProcess, timeout_s: float = 90.0) -> None:
    """Start a service and wait for its ready line."""
    await service.start()
    deadline = time.monotonic() + timeout_s
    while not service.is_ready():
        if not service.running:
            raise RuntimeError(f"{service.name} exited; see {service.log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{service.name} not ready in {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_bytes(pid: int) -> int:
    """Resident set size of a process."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class PersistedRecorder:
    """Every ``state.persisted`` event, with futures resolved by content hash."""

    connection: AbstractRobustConnection
    waiters: dict[str, asyncio.Future[float]] = field(default_factory=dict)
    count: int = 0
    listeners: list[Callable[[tuple[float, str, str]], None]] = field(default_factory=list)
    """Called with (arrival, vm_id, content_hash) of every event (the boot storm's log)."""

    @classmethod
    async def start(cls, amqp_url: str) -> PersistedRecorder:
        """Connect and start recording."""
        connection = await aio_pika.connect_robust(amqp_url, timeout=30)
        recorder = cls(connection)
        channel = await connection.channel()
        await declare_exchanges(channel)
        queue = await channel.declare_queue(
            f"bench.persisted.{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True
        )
        await queue.bind(EVENTS_EXCHANGE, routing_key="state.persisted.*")
        await queue.consume(recorder._on_message, no_ack=True)
        return recorder

    def expect(self, vm_id: str, content_hash: str) -> asyncio.Future[float]:
        """A future resolved with the arrival time (monotonic) of this VM's content's event."""
        key = f"{vm_id}:{content_hash}"
        future = self.waiters.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self.waiters[key] = future
        return future

    def forget(self, vm_id: str, content_hash: str) -> None:
        """Stop waiting for this content (it timed out)."""
        self.waiters.pop(f"{vm_id}:{content_hash}", None)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.monotonic()
        try:
            if peek_type(message.body) != StatePersisted.message_type:
                return
            event = decode(message.body, StatePersisted)
        except MessageError:
            return
        self.count += 1
        for listener in self.listeners:
            listener((now, event.data.vm_id, event.data.content_hash))
        future = self.waiters.pop(f"{event.data.vm_id}:{event.data.content_hash}", None)
        if future is not None and not future.done():
            future.set_result(now)

    async def close(self) -> None:
        """Stop recording."""
        await self.connection.close()


def python_exe() -> str:
    """The interpreter the services run under."""
    return sys.executable
