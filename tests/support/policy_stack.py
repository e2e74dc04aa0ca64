"""Real services as processes for the policy integration tests: one state store, policy
replicas and host agents on simulated hosts (libvirt ``test:///`` files), plus what a test
does to them: write a guest's TPM state, freeze or kill an agent, publish what a host would.

As in production, each host agent connects as its own RabbitMQ user named after the host,
and the store and policy check that a host's messages come from that user; given the
session's Redis users, the store and policy each log in to Redis as their own user.

Host ids carry a run id, so the broker and Redis shared with the rest of the session never
mix this stack's hosts with another test's.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import yarl
from redis.asyncio import Redis

from keeper_devtools.demo.hosts import SimulatedHost
from keeper_devtools.demo.processes import ServiceProcess
from keeper_devtools.localstack.redis_users import POLICY, STORE, RedisUsers
from keeper_devtools.swtpm_lab import permall_framing
from keeper_shared.bus.client import BusClient
from keeper_shared.bus.topology import (
    host_command_key,
)
from keeper_shared.keeper_client.client import KeeperClient
from keeper_shared.messages.commands import ReplyT
from keeper_shared.messages.envelope import (
    Payload,
)
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.keys import hosts_key, placement_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.keys import SealingPublicKey
from keeper_shared.state_format.blobs import content_hash
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.crypto.encryption import generate_key_file
from support.broker import Broker
from support.bus_hygiene import purge_service_queues
from support.events import EventRecorder
from support.sealing_keys import key_file
from support.waiting import wait_until

STEP_TIMEOUT_S = 45.0
"""Bound on any one wait; only a hang reaches it."""

FAST_POLICY = {
    "KEEPER_POLICY_RETRIEVE_TIMEOUT_S": "2",
    "KEEPER_POLICY_HOST_COMMAND_TIMEOUT_S": "3",
    "KEEPER_POLICY_HOST_LOST_AFTER_S": "30",
    "KEEPER_POLICY_LIVENESS_CHECK_INTERVAL_S": "0.5",
    "KEEPER_POLICY_WORKFLOW_LEASE_S": "3",
    "KEEPER_POLICY_WORKFLOW_SWEEP_INTERVAL_S": "0.5",
    "KEEPER_POLICY_SHUTDOWN_GRACE_S": "2",
}
"""Short bounds so failure paths end in seconds, not minutes."""


@dataclass
class PolicyStack:
    """The services of one test, started by ``async with``."""

    broker: Broker
    redis_url: str
    work_dir: Path
    host_names: tuple[str, ...] = ("a", "b")
    policy_env: dict[str, str] = field(default_factory=dict)
    policy_replicas: int = 1
    agent_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Extra environment per host name (e.g. a PATH with another swtpm)."""
    store_env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the store (over the stack's short bounds)."""
    redis_users: RedisUsers | None = None
    """The Redis users of ``redis_url``'s server: the store and policy then log in as
    theirs (least privilege), the test itself as ``redis_url``'s user. None: all as that."""
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, SimulatedHost] = field(default_factory=dict)
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    _client: KeeperClient | None = None
    _redis: Redis | None = None
    _observer: BusClient | None = None
    _events: EventRecorder | None = None
    _publishers: dict[str, BusClient] = field(default_factory=dict)
    _host_passwords: dict[str, str] = field(default_factory=dict)
    _store_sealing_key: SealingPublicKey | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> PolicyStack:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        await purge_service_queues(self.amqp_url)
        kek = self.work_dir / "kek.key"
        generate_key_file(kek)
        store_sealing = self.work_dir / "store-sealing.key"
        self._store_sealing_key = key_file(store_sealing)
        self._redis = Redis.from_url(self.redis_url)
        self.services["store"] = self._service(
            "store",
            "keeper_state_store",
            {
                "KEEPER_STORE_AMQP_URL": self.amqp_url,
                "KEEPER_STORE_REDIS_URL": self.service_redis_url(STORE),
                "KEEPER_STORE_KEK_FILE": str(kek),
                "KEEPER_STORE_SEALING_KEY_FILE": str(store_sealing),
                "KEEPER_STORE_VERIFY_HOST_IDENTITY": "true",
                "KEEPER_STORE_FETCH_TIMEOUT_S": "1.5",
                "KEEPER_STORE_PREPARE_TIMEOUT_S": "3",
                "KEEPER_STORE_SHUTDOWN_GRACE_S": "2",
                **self.store_env,
            },
        )
        for index in range(self.policy_replicas):
            self.services[f"policy-{index}"] = self.policy_process(index)
        for name in self.host_names:
            host = SimulatedHost(f"{name}-{self.run_id}", self.work_dir / f"host-{name}")
            host.create()
            self.hosts[name] = host
            password = secrets.token_hex(12)
            self.broker.add_user(host.host_id, password)
            self._host_passwords[name] = password
            self.services[name] = self.agent_process(name, **self.agent_env.get(name, {}))
        started = time.time()
        try:
            for service in self.services.values():
                await service.start()
            await wait_until(
                lambda: self.heard_from([h.host_id for h in self.hosts.values()], started),
                "every host's heartbeat to reach policy",
            )
            self._client = await KeeperClient.connect(
                self.amqp_url, name=f"test-{self.run_id}", request_timeout_s=60
            )
            self._observer = await BusClient.connect(
                self.amqp_url, source=f"test/{self.run_id}", origin="test"
            )
            self._events = await EventRecorder.start(
                self.amqp_url, name=f"test/{self.run_id} events"
            )
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop everything this stack started, whatever state it is in."""
        for service in self.services.values():
            if service.process is not None and service.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    service.process.send_signal(signal.SIGCONT)  # a frozen one cannot stop
        for service in reversed(list(self.services.values())):
            await service.stop(grace_s=10)
        for publisher in self._publishers.values():
            await publisher.close()
        if self._events is not None:
            await self._events.close()
        if self._observer is not None:
            await self._observer.close()
        if self._client is not None:
            await self._client.close()
        if self._redis is not None:
            await self._redis.aclose()

    def service_redis_url(self, user: str) -> str:
        """``redis_url`` as the service's own Redis user (when the stack knows the users)."""
        if self.redis_users is None:
            return self.redis_url
        name, password = self.redis_users.login(user)
        return str(yarl.URL(self.redis_url).with_user(name).with_password(password))

    def _service(self, name: str, module: str, env: dict[str, str]) -> ServiceProcess:
        return ServiceProcess(
            name, module, {"KEEPER_LOG_JSON": "true", **env}, self.work_dir / f"{name}.log"
        )

    def policy_process(self, index: int) -> ServiceProcess:
        """A policy replica (not started)."""
        return self._service(
            f"policy-{index}",
            "keeper_policy",
            {
                "KEEPER_POLICY_AMQP_URL": self.amqp_url,
                "KEEPER_POLICY_REDIS_URL": self.service_redis_url(POLICY),
                **FAST_POLICY,
                **self.policy_env,
            },
        )

    def agent_process(self, name: str, **env: str) -> ServiceProcess:
        """The host agent of host ``name`` (not started)."""
        host = self.hosts[name]
        assert self._store_sealing_key is not None, "the stack makes the store's key first"
        return self._service(
            name,
            "keeper_host_agent",
            {
                "KEEPER_HOST_HOST_ID": host.host_id,
                "KEEPER_HOST_AMQP_URL": self.host_amqp_url(name),
                "KEEPER_HOST_LIBVIRT_URI": host.libvirt_uri,
                "KEEPER_HOST_SWTPM_ROOT": str(host.swtpm_root),
                "KEEPER_HOST_NVRAM_DIR": str(host.nvram_dir),
                "KEEPER_HOST_SNAPSHOT_DIR": str(host.snapshot_dir),
                "KEEPER_HOST_GENERATION_MARK_FILE": str(host.generation_mark_file),
                "KEEPER_HOST_SEALING_KEY_FILE": str(host.sealing_key_file),
                "KEEPER_HOST_STORE_SEALING_KEY": self._store_sealing_key.to_text(),
                "KEEPER_HOST_STABILITY_WINDOW_S": "0.2",
                "KEEPER_HOST_HEARTBEAT_INTERVAL_S": "0.5",
                "KEEPER_HOST_RESCAN_INTERVAL_S": "1",
                "KEEPER_HOST_SHUTDOWN_GRACE_S": "2",
                **env,
            },
        )

    @property
    def amqp_url(self) -> str:
        """The broker as the services other than host agents use it."""
        return self.broker.url

    def host_amqp_url(self, name: str) -> str:
        """The broker as host ``name``'s own user."""
        return self.broker.url_for(self.host_id(name), self._host_passwords[name])

    # --- access ---------------------------------------------------------------------------

    @property
    def store_sealing_key(self) -> SealingPublicKey:
        """The store's public sealing key, which what is sent to the store is sealed to."""
        assert self._store_sealing_key is not None, "the stack makes the store's key first"
        return self._store_sealing_key

    @property
    def client(self) -> KeeperClient:
        """The client a person or automation would use."""
        assert self._client is not None
        return self._client

    @property
    def events(self) -> EventRecorder:
        """Every event published since the stack came up."""
        assert self._events is not None
        return self._events

    @property
    def redis(self) -> Redis:
        """Redis, to look at what policy recorded."""
        assert self._redis is not None
        return self._redis

    def host_id(self, name: str) -> str:
        """The bus id of host ``name``."""
        return self.hosts[name].host_id

    async def heard_from(self, host_ids: list[str], since: float) -> bool:
        """Policy recorded a heartbeat from each host after ``since``."""
        records = await awaited(self.redis.hmget(hosts_key(), host_ids))
        return all(r is not None and json.loads(r)["last_seen"] >= since for r in records)

    async def placement(self, vm_id: str) -> tuple[str, int]:
        """(host, epoch) of the VM's placement as the store's fencing reads it."""
        raw = await awaited(self.redis.hgetall(placement_key(vm_id)))
        return raw.get(b"host", b"").decode(), int(raw.get(b"epoch", 0))

    # --- what a test does -----------------------------------------------------------------

    async def new_vm(self, host: str) -> VmSpec:
        """A Windows 11 VM with an approved TPM, started on host ``host``."""
        vm_id = str(uuid.uuid4())
        spec = VmSpec(vm_id=vm_id, name=f"vm-{vm_id[:8]}", guest_os="windows-11")
        await self.client.request_tpm(spec)
        await self.client.place(vm_id, self.host_id(host))
        return spec

    def write_tpm(self, host: str, vm_id: str) -> str:
        """What swtpm does when the guest uses its TPM: new state written to a temp file and
        renamed over the old. Returns the canonical hash the agent and the store will use."""
        tpm_dir = self.hosts[host].tpm_dir(vm_id)
        tpm_dir.mkdir(parents=True, exist_ok=True)
        state = permall_framing(os.urandom(4096))
        temp = tpm_dir / "TMP2-00.permall"
        temp.write_bytes(state)
        temp.chmod(0o600)
        temp.rename(tpm_dir / MAIN_STATE_FILE_NAME)
        return content_hash(pack_tpm_state({MAIN_STATE_FILE_NAME: state}))

    async def write_tpm_persisted(self, host: str, vm_id: str) -> str:
        """Write new TPM state and wait until the store announced it persisted."""
        digest = self.write_tpm(host, vm_id)
        await self.events.wait_for(
            StatePersisted,
            lambda e: e.vm_id == vm_id and e.kind is StateKind.TPM and e.content_hash == digest,
            STEP_TIMEOUT_S,
        )
        return digest

    def signal(self, name: str, sig: signal.Signals) -> None:
        """Send ``sig`` to service ``name`` (SIGSTOP freezes it: it answers nothing)."""
        process = self.services[name].process
        assert process is not None
        process.send_signal(sig)

    async def command_host(
        self, name: str, payload: Payload, reply_type: type[ReplyT], subject: str
    ) -> ReplyT:
        """Send a command straight to host ``name``'s agent, bypassing policy."""
        assert self._observer is not None
        reply = await self._observer.call(
            host_command_key(self.host_id(name)),
            payload,
            reply_type,
            subject=subject,
            timeout_s=10,
        )
        return reply.data

    async def publish_as_host(self, name: str, payload: Payload, subject: str) -> None:
        """Publish an event exactly as host ``name``'s agent would (its user, its origin,
        its key)."""
        host_id = self.host_id(name)
        publisher = self._publishers.get(name)
        if publisher is None:
            publisher = await BusClient.connect(
                self.host_amqp_url(name), source=f"host-agent/{host_id}", origin=host_id
            )
            self._publishers[name] = publisher
        await publisher.publish_event(payload, subject=subject)
