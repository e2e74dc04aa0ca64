"""A small multi-host chaos harness: every service a real process, faults injected from here.

- `ChaosCluster` starts M state-store replicas, P policy replicas and N host agents (each on
  its own simulated host: a libvirt ``test:///`` file, a swtpm root and an NVRAM directory)
  against a RabbitMQ node and a Redis server, registers and places VMs through the client,
  records every ``state.persisted`` and ``state.refused`` event, and stops every process it
  started, SIGKILL as the fallback, whatever happened. A restarted agent finds its host's
  VMs still running (`ChaosCluster.keep_running_domains`); agents and store replicas can be
  pointed at proxies, and agents run under a command prefix (a network namespace).
- `StateLoad` changes each VM's TPM and NVRAM on disk the way swtpm and OVMF do (new TPM
  state written to ``TMP2-00.permall`` then renamed; NVRAM changed in place) and remembers
  the canonical hash and time of every content it wrote.
- `ReplicaKiller` SIGKILLs one of a set of services at random every few seconds and restarts
  it.
- `analyse` checks what the store holds and announced against what the load wrote: the head
  is the last content written, the history never puts older over newer, every stored
  content is one that was written (no torn read), and no version repeats its predecessor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aio_pika
from redis.asyncio import Redis

from keeper_devtools.demo.hosts import OVMF_VARS_SIZE, OVMF_VARS_TEMPLATE, SimulatedHost
from keeper_devtools.demo.processes import ServiceProcess
from keeper_devtools.swtpm_lab import permall_framing
from keeper_host_agent.hypervisor.domain_xml import fill_nvram_path
from keeper_policy.placement.domain_definition import domain_xml
from keeper_shared.keeper_client.client import KeeperClient
from keeper_shared.messages.state import StatePersisted, StateWriteRefused
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import hosts_key, state_head_key, state_meta_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.keys import (
    SealingPublicKey,
    create_private_key_file,
    load_private_key,
)
from keeper_shared.state_format.blobs import content_hash
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.crypto.encryption import generate_key_file
from keeper_state_store.storage.version_meta import unpack_version_meta
from support.bus_hygiene import purge_service_queues
from support.events import EventRecorder, Seen
from support.waiting import WaitTimeoutError, wait_until

STARTUP_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
TPM_TEMP_FILE_NAME = "TMP2-00.permall"
"""swtpm writes new state here, then renames it over ``tpm2-00.permall``."""
NVRAM_WRITE_SIZE = 64
GUEST_OS = "windows-11"
TPM_XML = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")

LIVE_PROCESS_GROUPS: set[int] = set()
"""Process groups started here and not yet reaped: a last-resort cleanup (see conftest)
SIGKILLs what is left when a test was torn down without reaching its own cleanup."""


class ChaosError(RuntimeError):
    """The harness could not set the scene (a service exited, a request failed); what it
    waited for in vain raises `WaitTimeoutError` instead."""


# --- configuration and services -----------------------------------------------------------


def host_id_for(run_id: str, index: int) -> str:
    """The id of a run's ``index``-th host (from 1), also its RabbitMQ user name."""
    return f"chaos-{run_id}-h{index}"


@dataclass(frozen=True)
class ClusterConfig:
    """What to start, and against which broker and Redis."""

    amqp_url: str
    redis_url: str
    work_dir: Path
    """Hosts, logs and the KEK live here (created)."""
    hosts: int = 2
    store_replicas: int = 3
    policy_replicas: int = 1
    stability_window_s: float = 0.2
    heartbeat_interval_s: float = 1.0
    rescan_interval_s: float = 2.0
    history_depth: int = 1000
    """Keep every version a run makes, so the whole history can be checked."""
    scrub_swtpm: bool = False
    """The load writes random bytes as TPM state, which no swtpm can load: the scrubber's
    swtpm probe would rightly flag every version and spend the CPU the run needs. The rest
    of the scrubber (decrypt, decompress, hash) runs as in production."""
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    """Makes host ids unique in a broker and Redis shared with other tests."""
    verify_host_identity: bool = False
    """The store and policy trust a host's messages only from the host's own RabbitMQ user;
    on when each agent connects as its own user (see `agent_amqp_urls`)."""
    agent_amqp_urls: tuple[str, ...] = ()
    """Per host (in order), the URL its agent connects to instead of ``amqp_url``: a proxy
    that can cut the host off."""
    agent_command_prefixes: tuple[tuple[str, ...], ...] = ()
    """Per host (in order), the command its agent runs under (``ip netns exec NS``)."""
    store_redis_urls: tuple[str, ...] = ()
    """Per store replica (in order), the Redis URL it uses instead of ``redis_url``: a
    proxy that can lose a reply."""
    store_env: Mapping[str, str] = field(default_factory=dict)
    """Added to every store replica's environment (``PYTHONPATH`` of an older release,
    ``KEEPER_UPGRADE_LEVEL``: tests/integration/upgrade)."""
    policy_env: Mapping[str, str] = field(default_factory=dict)
    """Added to every policy replica's environment, likewise."""
    agent_envs: tuple[Mapping[str, str], ...] = ()
    """Per host (in order), added to its agent's environment, likewise."""


@dataclass(frozen=True)
class ChaosVm:
    """A VM placed on one simulated host."""

    vm_id: str
    name: str
    host: SimulatedHost
    epoch: int


@dataclass(frozen=True)
class Head:
    """The store's head record of one VM and kind, read straight from Redis."""

    version: int
    content_hash: str
    token: FencingToken


@dataclass(frozen=True)
class StoredVersion:
    """One version's metadata as the store keeps it in Redis."""

    version: int
    content_hash: str
    token: FencingToken
    stored_at: float
    """When the store wrote it (its wall clock, the same machine's)."""


class ChaosCluster:
    """Every service of a run as a real process, and the client that drives them."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.kek_file = config.work_dir / "keys" / "kek.key"
        self.store_sealing_key_file = self.kek_file.with_name("store-sealing.key")
        # Made now, not at start: every agent's environment pins its public key.
        if not self.store_sealing_key_file.exists():
            create_private_key_file(self.store_sealing_key_file)
        self.store_sealing_key = SealingPublicKey(
            load_private_key(self.store_sealing_key_file).public_key()
        )
        self.logs_dir = config.work_dir / "logs"
        self.hosts = [
            SimulatedHost(host_id_for(config.run_id, index), config.work_dir / f"host-{index}")
            for index in range(1, config.hosts + 1)
        ]
        self.stores = [self._store(index) for index in range(1, config.store_replicas + 1)]
        self.policies = [self._policy(index) for index in range(1, config.policy_replicas + 1)]
        self.agents = [self._agent(index, host) for index, host in enumerate(self.hosts)]
        self.vms: list[ChaosVm] = []
        self.kills = 0
        self._log_offsets: dict[str, int] = {}
        self._client: KeeperClient | None = None
        self._recorder: EventRecorder | None = None
        self._redis: Redis | None = None

    @property
    def services(self) -> list[ServiceProcess]:
        """Every service process, in start order."""
        return [*self.stores, *self.policies, *self.agents]

    @property
    def client(self) -> KeeperClient:
        """The client (after start)."""
        if self._client is None:
            raise ChaosError("the cluster is not started")
        return self._client

    @property
    def recorder(self) -> EventRecorder:
        """The event recorder (after start)."""
        if self._recorder is None:
            raise ChaosError("the cluster is not started")
        return self._recorder

    def persisted_for(self, vm_ids: set[str]) -> list[Seen[StatePersisted]]:
        """``state.persisted`` events of these VMs recorded so far, oldest first (a copy:
        later events do not change it)."""
        return self.recorder.matching(StatePersisted, lambda e: e.vm_id in vm_ids)

    def refused_for(self, vm_ids: set[str]) -> list[Seen[StateWriteRefused]]:
        """``state.refused`` events concerning these VMs recorded so far."""
        return self.recorder.matching(StateWriteRefused, lambda e: e.vm_id in vm_ids)

    @property
    def redis(self) -> Redis:
        """A Redis client of the harness's own (after start)."""
        if self._redis is None:
            raise ChaosError("the cluster is not started")
        return self._redis

    @property
    def vm_ids(self) -> set[str]:
        """Ids of the VMs placed so far."""
        return {vm.vm_id for vm in self.vms}

    def _store(self, index: int) -> ServiceProcess:
        replica = f"store-{index}"
        redis_urls = self.config.store_redis_urls
        redis_url = redis_urls[index - 1] if index <= len(redis_urls) else self.config.redis_url
        return ServiceProcess(
            replica,
            "keeper_state_store",
            {
                "KEEPER_STORE_AMQP_URL": self.config.amqp_url,
                "KEEPER_STORE_REDIS_URL": redis_url,
                "KEEPER_STORE_KEK_FILE": str(self.kek_file),
                "KEEPER_STORE_SEALING_KEY_FILE": str(self.store_sealing_key_file),
                "KEEPER_STORE_VERIFY_HOST_IDENTITY": str(self.config.verify_host_identity).lower(),
                "KEEPER_STORE_REPLICA_ID": replica,
                "KEEPER_STORE_HISTORY_DEPTH": str(self.config.history_depth),
                "KEEPER_STORE_SCRUB_SWTPM": str(self.config.scrub_swtpm).lower(),
                "KEEPER_STORE_LOG_JSON": "true",
                "KEEPER_STORE_SHUTDOWN_GRACE_S": "5",
                **self.config.store_env,
            },
            self.logs_dir / f"{replica}.log",
        )

    def _policy(self, index: int) -> ServiceProcess:
        return ServiceProcess(
            f"policy-{index}",
            "keeper_policy",
            {
                "KEEPER_POLICY_AMQP_URL": self.config.amqp_url,
                "KEEPER_POLICY_REDIS_URL": self.config.redis_url,
                "KEEPER_POLICY_VERIFY_HOST_IDENTITY": str(self.config.verify_host_identity).lower(),
                "KEEPER_POLICY_LOG_JSON": "true",
                "KEEPER_POLICY_HOST_LOST_AFTER_S": "15",
                "KEEPER_POLICY_SHUTDOWN_GRACE_S": "5",
                **self.config.policy_env,
            },
            self.logs_dir / f"policy-{index}.log",
        )

    def _agent(self, index: int, host: SimulatedHost) -> ServiceProcess:
        config = self.config
        amqp_urls = config.agent_amqp_urls
        amqp_url = amqp_urls[index] if index < len(amqp_urls) else config.amqp_url
        prefixes = config.agent_command_prefixes
        extra_env = config.agent_envs[index] if index < len(config.agent_envs) else {}
        return ServiceProcess(
            host.host_id,
            "keeper_host_agent",
            {
                "KEEPER_HOST_HOST_ID": host.host_id,
                "KEEPER_HOST_AMQP_URL": amqp_url,
                "KEEPER_HOST_LIBVIRT_URI": host.libvirt_uri,
                "KEEPER_HOST_SWTPM_ROOT": str(host.swtpm_root),
                "KEEPER_HOST_NVRAM_DIR": str(host.nvram_dir),
                "KEEPER_HOST_SNAPSHOT_DIR": str(host.snapshot_dir),
                "KEEPER_HOST_GENERATION_MARK_FILE": str(host.generation_mark_file),
                "KEEPER_HOST_SEALING_KEY_FILE": str(host.sealing_key_file),
                "KEEPER_HOST_STORE_SEALING_KEY": self.store_sealing_key.to_text(),
                "KEEPER_HOST_STABILITY_WINDOW_S": str(config.stability_window_s),
                "KEEPER_HOST_HEARTBEAT_INTERVAL_S": str(config.heartbeat_interval_s),
                "KEEPER_HOST_RESCAN_INTERVAL_S": str(config.rescan_interval_s),
                "KEEPER_HOST_LOG_JSON": "true",
                "KEEPER_HOST_SHUTDOWN_GRACE_S": "5",
                **extra_env,
            },
            self.logs_dir / f"{host.host_id}.log",
            command_prefix=prefixes[index] if index < len(prefixes) else (),
        )

    async def __aenter__(self) -> ChaosCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Lay out the hosts, start every service, wait for every host's heartbeat."""
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        self.kek_file.parent.mkdir(parents=True, exist_ok=True)
        if not self.kek_file.exists():
            generate_key_file(self.kek_file)
        for host in self.hosts:
            host.create()
        await purge_service_queues(self.config.amqp_url)
        self._redis = Redis.from_url(self.config.redis_url)
        self._recorder = await EventRecorder.start(
            self.config.amqp_url, "state.persisted.*", "state.refused.*", name="chaos-recorder"
        )
        started_at = time.time()
        for service in self.services:
            await self._launch(service)
        host_ids = [host.host_id for host in self.hosts]

        async def every_service_ready() -> bool:
            self.check_running()
            if not all(self.is_ready(service) for service in self.services):
                return False
            records = await awaited(self.redis.hmget(hosts_key(), host_ids))
            return all(
                record is not None and json.loads(record)["last_seen"] >= started_at
                for record in records
            )

        await wait_until(
            every_service_ready,
            "every service to be ready and every host's heartbeat to reach policy",
            STARTUP_TIMEOUT_S,
        )
        self._client = await KeeperClient.connect(
            self.config.amqp_url, name=f"chaos-{self.config.run_id}", request_timeout_s=60
        )

    async def _launch(self, service: ServiceProcess) -> None:
        """Start a service, remembering where its log stood (a restart appends to it)."""
        try:
            self._log_offsets[service.name] = service.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offsets[service.name] = 0
        await service.start()
        if service.process is not None:
            LIVE_PROCESS_GROUPS.add(service.process.pid)

    def is_ready(self, service: ServiceProcess) -> bool:
        """True once the service logged that it is ready since it was last started."""
        return service.is_ready(from_offset=self._log_offsets.get(service.name, 0))

    async def wait_ready(self, services: Sequence[ServiceProcess], timeout_s: float) -> float:
        """Wait until each of ``services`` is ready; return how long that took."""

        async def ready() -> bool:
            self.check_running()
            return all(self.is_ready(service) for service in services)

        return await wait_until(ready, "services to be ready", timeout_s)

    def check_running(self) -> None:
        """Raise ChaosError naming any service that exited on its own."""
        dead = [
            f"{service.name} (exit {service.process.returncode}, log {service.log_path})"
            for service in self.services
            if service.process is not None and not service.running
        ]
        if dead:
            raise ChaosError(f"services exited: {', '.join(dead)}")

    async def stop(self) -> dict[str, int | None]:
        """Stop everything started: SIGTERM, then SIGKILL of the whole process group."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None
        if self._recorder is not None:
            with contextlib.suppress(Exception):
                await self._recorder.close()
        services = self.services
        codes = await asyncio.gather(*(stop_service(service) for service in services))
        with contextlib.suppress(Exception):
            await purge_service_queues(self.config.amqp_url)
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None
        return dict(zip([service.name for service in services], codes, strict=True))

    async def kill(self, service: ServiceProcess) -> None:
        """SIGKILL a service (its whole process group), as a crash would, and reap it."""
        if service.process is None or not service.running:
            return
        kill_group(service)
        await service.process.wait()
        LIVE_PROCESS_GROUPS.discard(service.process.pid)
        self.kills += 1

    async def restart(self, service: ServiceProcess) -> None:
        """Start a killed service again (its log continues in the same file)."""
        if service.running:
            raise ChaosError(f"{service.name} is still running")
        if service in self.agents:
            self.keep_running_domains(self.hosts[self.agents.index(service)])
        await self._launch(service)

    def keep_running_domains(self, host: SimulatedHost) -> None:
        """Write the host's VMs into its libvirt node file as running domains.

        A real hypervisor outlives its agent: killed and restarted, the agent finds the VMs
        still running. The ``test:///`` driver lives inside the agent's process and dies
        with it, but reads the domains of its node file when opened again.
        """
        domains = [
            fill_nvram_path(
                domain_xml(
                    VmSpec(vm_id=vm.vm_id, name=vm.name, guest_os=GUEST_OS),
                    tpm_xml=TPM_XML,
                    epoch=vm.epoch,
                    ovmf_code=OVMF_CODE,
                    ovmf_vars_template=OVMF_VARS_TEMPLATE,
                ),
                host.nvram_dir,
            )
            for vm in self.vms
            if vm.host is host
        ]
        node = "<node>\n" + "\n".join(domains) + "\n</node>\n"
        (host.root / "libvirt-node.xml").write_text(node, encoding="utf-8")

    async def place_vms(self, per_host: int, guest_os: str = GUEST_OS) -> list[ChaosVm]:
        """Register ``per_host`` VMs for each host and start them there."""
        placed = []
        for host in self.hosts:
            for _ in range(per_host):
                vm_id = str(uuid.uuid4())
                spec = VmSpec(vm_id=vm_id, name=f"chaos-{vm_id[:8]}", guest_os=guest_os)
                await self.client.enable_tpm(spec, override=True)
                epoch = await self.client.start(vm_id, host.host_id)
                placed.append(ChaosVm(vm_id, spec.name, host, epoch))
        self.vms.extend(placed)
        return placed

    async def head(self, vm_id: str, kind: StateKind) -> Head | None:
        """The store's head record for the VM and kind, None when nothing is stored."""
        raw = await awaited(self.redis.hgetall(state_head_key(vm_id, kind)))
        if not raw or b"version" not in raw:
            return None
        return Head(
            version=int(raw[b"version"]),
            content_hash=raw[b"hash"].decode(),
            token=FencingToken(epoch=int(raw[b"epoch"]), generation=int(raw[b"generation"])),
        )

    async def stored_versions(self, vm_id: str, kind: StateKind) -> dict[int, StoredVersion]:
        """Every version whose metadata the store keeps, by version number."""
        raw = await awaited(self.redis.hgetall(state_meta_key(vm_id, kind)))
        versions = {}
        for number, meta_raw in raw.items():
            meta = unpack_version_meta(meta_raw)
            version = int(number)
            versions[version] = StoredVersion(
                version=version,
                content_hash=meta.content_hash,
                token=meta.token,
                stored_at=meta.stored_at.timestamp(),
            )
        return versions

    async def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` now (e.g. a dead-letter queue); 0 when it is absent."""
        connection = self.recorder.connection
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return 0
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        result = declared.declaration_result
        return int(result.message_count or 0)

    def count_log_lines(self, needle: str, services: Sequence[ServiceProcess]) -> int:
        """How many lines of these services' logs contain ``needle``."""
        total = 0
        for service in services:
            with contextlib.suppress(FileNotFoundError):
                text = service.log_path.read_text(encoding="utf-8", errors="replace")
                total += sum(needle in line for line in text.splitlines())
        return total


def kill_group(service: ServiceProcess) -> None:
    """SIGKILL the service's process group (it leads its own session)."""
    if service.process is not None:
        kill_process_group(service.process.pid)


def kill_process_group(pgid: int) -> None:
    """SIGKILL a process group; nothing happens when it is gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def kill_leftovers() -> list[int]:
    """SIGKILL every process group started here that was not reaped; return their ids."""
    left = sorted(LIVE_PROCESS_GROUPS)
    for pgid in left:
        kill_process_group(pgid)
    LIVE_PROCESS_GROUPS.clear()
    return left


async def stop_service(service: ServiceProcess, grace_s: float = STOP_GRACE_S) -> int | None:
    """SIGTERM and a bounded wait; then SIGKILL whatever is left of its process group."""
    try:
        return await service.stop(grace_s)
    finally:
        kill_group(service)
        if service.process is not None:
            LIVE_PROCESS_GROUPS.discard(service.process.pid)


# --- load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One content the load put in place: its canonical hash and when (wall clock)."""

    content_hash: str
    at: float


class StateLoad:
    """Changes every VM's TPM and NVRAM on disk the way swtpm and OVMF do.

    Each VM changes one of its two states every ``change_interval_s`` on average (jittered,
    VMs spread out). The first change of a VM lays out its NVRAM from the firmware template
    and its swtpm ``tpm2`` directory (0700) with a first state. Every content written is
    remembered, in order, with its canonical hash (the hash the agent and the store use).
    ``embed_in_tpm`` starts every TPM state (a leak canary: a secret the guest sealed).
    """

    def __init__(
        self,
        vms: Sequence[ChaosVm],
        *,
        change_interval_s: float = 0.3,
        tpm_state_size: int = 6 * 1024,
        seed: int | None = None,
        embed_in_tpm: bytes = b"",
    ) -> None:
        self.vms = list(vms)
        self.embed_in_tpm = embed_in_tpm
        self.change_interval_s = change_interval_s
        self.tpm_state_size = tpm_state_size
        self.seed = seed if seed is not None else secrets.randbits(32)
        self._rng = random.Random(self.seed)
        self.writes: dict[tuple[str, StateKind], list[Write]] = {}
        self._nvram: dict[str, bytearray] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    @property
    def changes(self) -> int:
        """How many contents were written in all."""
        return sum(len(writes) for writes in self.writes.values())

    def last(self, vm_id: str, kind: StateKind) -> Write:
        """The newest content written for the VM and kind."""
        return self.writes[(vm_id, kind)][-1]

    def order(self, vm_id: str, kind: StateKind) -> dict[str, int]:
        """Content hash -> position in the order the load wrote it."""
        return {write.content_hash: i for i, write in enumerate(self.writes[(vm_id, kind)])}

    def start(self) -> None:
        """Lay out every VM's first state, then change them in the background."""
        self.started_at = time.time()
        for vm in self.vms:
            self.write_nvram(vm)
            self.write_tpm(vm)
        self._tasks = [asyncio.create_task(self._change_forever(vm)) for vm in self.vms]

    async def stop(self) -> None:
        """Stop changing; every write that was started has finished when this returns."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in self._tasks:
            if not task.cancelled() and task.exception() is not None:
                raise ChaosError("the load generator failed") from task.exception()
        self._tasks = []
        if self.stopped_at is None:
            self.stopped_at = time.time()

    async def _change_forever(self, vm: ChaosVm) -> None:
        rng = random.Random(self._rng.getrandbits(64))
        await asyncio.sleep(rng.uniform(0, self.change_interval_s))
        kind = rng.choice(list(StateKind))
        while not self._stop.is_set():
            if kind is StateKind.TPM:
                self.write_tpm(vm)
            else:
                self.write_nvram(vm)
            kind = StateKind.NVRAM if kind is StateKind.TPM else StateKind.TPM
            await asyncio.sleep(self.change_interval_s * rng.uniform(0.6, 1.4))

    def _record(self, vm: ChaosVm, kind: StateKind, digest: str) -> None:
        self.writes.setdefault((vm.vm_id, kind), []).append(Write(digest, time.time()))

    def write_tpm(self, vm: ChaosVm) -> None:
        """New TPM state as swtpm writes it: a temp file, then a rename over the old one."""
        tpm_dir = vm.host.tpm_dir(vm.vm_id)
        if not tpm_dir.is_dir():
            tpm_dir.parent.mkdir(exist_ok=True)
            tpm_dir.parent.chmod(0o711)
            tpm_dir.mkdir(exist_ok=True)
            tpm_dir.chmod(0o700)
        state = permall_framing(
            self.embed_in_tpm + os.urandom(self.tpm_state_size - len(self.embed_in_tpm))
        )
        temp = tpm_dir / TPM_TEMP_FILE_NAME
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, state)
        finally:
            os.close(fd)
        os.rename(temp, tpm_dir / MAIN_STATE_FILE_NAME)
        self._record(vm, StateKind.TPM, content_hash(pack_tpm_state({MAIN_STATE_FILE_NAME: state})))

    def write_nvram(self, vm: ChaosVm) -> None:
        """A variable changed in place, as OVMF does; the first write copies the template."""
        path = vm.host.nvram_path(vm.name)
        mirror = self._nvram.get(vm.vm_id)
        if mirror is None:
            template = (
                OVMF_VARS_TEMPLATE.read_bytes()
                if OVMF_VARS_TEMPLATE.exists()
                else b"\xff" * OVMF_VARS_SIZE
            )
            mirror = self._nvram[vm.vm_id] = bytearray(template)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, template)
            finally:
                os.close(fd)
        else:
            offset = self._rng.randrange(0, len(mirror) - NVRAM_WRITE_SIZE)
            value = os.urandom(NVRAM_WRITE_SIZE)
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, value, offset)
            finally:
                os.close(fd)
            mirror[offset : offset + NVRAM_WRITE_SIZE] = value
        self._record(vm, StateKind.NVRAM, content_hash(bytes(mirror)))


# --- faults -------------------------------------------------------------------------------


class ReplicaKiller:
    """SIGKILLs one of ``victims`` at random every ``every_s`` seconds, then restarts it."""

    def __init__(
        self,
        cluster: ChaosCluster,
        victims: Sequence[ServiceProcess],
        *,
        every_s: tuple[float, float] = (2.0, 4.0),
        down_s: tuple[float, float] = (0.0, 0.5),
        seed: int | None = None,
    ) -> None:
        self._cluster = cluster
        self._victims = list(victims)
        self._every_s = every_s
        self._down_s = down_s
        self._rng = random.Random(seed)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.killed: list[str] = []

    def start(self) -> None:
        """Begin killing in the background."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop killing; every victim is running and ready again when this returns."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        for victim in self._victims:
            if not victim.running:
                await self._cluster.restart(victim)
        await self._cluster.wait_ready(self._victims, STARTUP_TIMEOUT_S)

    async def _pause(self, bounds: tuple[float, float]) -> bool:
        """Sleep a random time within ``bounds``; False when stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self._rng.uniform(*bounds))
        return not self._stop.is_set()

    async def _run(self) -> None:
        while await self._pause(self._every_s):
            victim = self._rng.choice(self._victims)
            await self._cluster.kill(victim)
            self.killed.append(victim.name)
            await self._pause(self._down_s)
            await self._cluster.restart(victim)


# --- checks -------------------------------------------------------------------------------


async def wait_until_stored(
    cluster: ChaosCluster, load: StateLoad, timeout_s: float
) -> float | None:
    """Wait until every VM's head, for both kinds, is the last content the load wrote;
    return how long that took, None when it did not happen in time (`analyse` says where)."""

    async def all_stored() -> bool:
        cluster.check_running()
        for vm in load.vms:
            for kind in StateKind:
                head = await cluster.head(vm.vm_id, kind)
                if head is None or head.content_hash != load.last(vm.vm_id, kind).content_hash:
                    return False
        return True

    try:
        return await wait_until(all_stored, "the newest state of every VM", timeout_s)
    except WaitTimeoutError:
        return None


@dataclass
class Analysis:
    """What the run shows, problem by problem, and its figures."""

    problems: list[str] = field(default_factory=list)
    versions_stored: int = 0
    versions_announced: int = 0
    max_recovery_s: float = 0.0
    """Longest time from a VM's last change to the announcement of that content."""
    unannounced_versions: int = 0
    """Versions in Redis without a ``state.persisted`` event (see `unannounced_finals`)."""
    unannounced_finals: int = 0
    """Final contents stored without a ``state.persisted`` event (a replica died between
    the write and the announcement, and the redelivery found it already stored)."""


async def analyse(cluster: ChaosCluster, load: StateLoad) -> Analysis:
    """Check the store against what the load wrote (see the module docstring)."""
    result = Analysis()
    persisted = cluster.persisted_for({vm.vm_id for vm in load.vms})
    events: dict[tuple[str, StateKind], list[Seen[StatePersisted]]] = {}
    for seen in persisted:
        events.setdefault((seen.data.vm_id, seen.data.kind), []).append(seen)
    result.versions_announced = len(persisted)
    for vm in load.vms:
        for kind in StateKind:
            key = (vm.vm_id, kind)
            where = f"{kind.value} of {vm.vm_id[:8]} on {vm.host.host_id}"
            order = load.order(vm.vm_id, kind)
            last = load.last(vm.vm_id, kind)
            head = await cluster.head(vm.vm_id, kind)
            stored = await cluster.stored_versions(vm.vm_id, kind)
            result.versions_stored += len(stored)
            announced = sorted(events.get(key, []), key=lambda seen: seen.data.version)
            if head is None:
                result.problems.append(f"{where}: nothing stored")
                continue
            if head.content_hash != last.content_hash:
                position = order.get(head.content_hash)
                result.problems.append(
                    f"{where}: head v{head.version} holds write #{position} of "
                    f"{len(order)}, not the last one"
                )
            check_chain(
                where,
                [(v.version, v.content_hash, v.token) for v in sorted(stored.values(), key=_v)],
                order,
                "stored",
                result.problems,
            )
            check_chain(
                where,
                # A redelivered change re-announces the stored version (same fact again, see
                # StateService.on_state_changed); only a differing repeat is a problem.
                list(
                    dict.fromkeys(
                        (s.data.version, s.data.content_hash, s.data.token) for s in announced
                    )
                ),
                order,
                "announced",
                result.problems,
            )
            if head.version not in stored or stored[head.version].token != head.token:
                result.problems.append(f"{where}: head v{head.version} has no matching metadata")
            if stored and max(stored) != head.version:
                result.problems.append(f"{where}: head v{head.version}, newest kept v{max(stored)}")
            for seen in announced:
                kept = stored.get(seen.data.version)
                if kept is None or kept.content_hash != seen.data.content_hash:
                    result.problems.append(
                        f"{where}: announced v{seen.data.version} is not what Redis holds"
                    )
                if seen.data.token.is_newer_than(head.token):
                    result.problems.append(
                        f"{where}: announced v{seen.data.version} has a newer token than the head"
                    )
            result.unannounced_versions += len(
                set(stored) - {seen.data.version for seen in announced}
            )
            final = [s for s in announced if s.data.content_hash == last.content_hash]
            if final:
                result.max_recovery_s = max(result.max_recovery_s, final[0].received_at - last.at)
            else:
                result.unannounced_finals += 1
    return result


def _v(version: StoredVersion) -> int:
    return version.version


def check_chain(
    where: str,
    chain: list[tuple[int, str, FencingToken]],
    order: dict[str, int],
    what: str,
    problems: list[str],
) -> None:
    """Versions in order: numbers distinct, tokens strictly growing, contents written by the
    load in the same order (never older over newer, no torn read), no repeat in a row."""
    for index, (version, digest, token) in enumerate(chain):
        if digest not in order:
            problems.append(f"{where}: {what} v{version} holds content the load never wrote")
        if index == 0:
            continue
        prev_version, prev_digest, prev_token = chain[index - 1]
        if version == prev_version:
            problems.append(f"{where}: {what} v{version} twice")
        if not token.is_newer_than(prev_token):
            problems.append(
                f"{where}: {what} v{version} token {token} is not newer than v{prev_version}'s"
            )
        if digest == prev_digest:
            problems.append(f"{where}: {what} v{version} repeats v{prev_version}'s content")
        elif digest in order and prev_digest in order and order[digest] < order[prev_digest]:
            problems.append(
                f"{where}: {what} v{version} is older content than v{prev_version} "
                "(older over newer)"
            )


def figures_table(title: str, rows: Sequence[tuple[str, object]]) -> str:
    """A two-column table of figures, ready to print."""
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * (width + 16)]
    for name, value in rows:
        if value is None:
            shown = "n/a"
        elif isinstance(value, float):
            shown = f"{value:.2f}"
        else:
            shown = str(value)
        lines.append(f"{name:<{width}}  {shown:>12}")
    return "\n".join(lines)
