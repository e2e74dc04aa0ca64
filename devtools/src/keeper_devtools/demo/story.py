"""The story, all real: seal a secret on host-a, move the VM to host-b, read it back there."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from redis.asyncio import Redis

from keeper_devtools.demo.bus_users import BrokerAccounts, DemoBusUsers, create_bus_users
from keeper_devtools.demo.console import console_answers, console_service
from keeper_devtools.demo.hosts import SimulatedHost
from keeper_devtools.demo.processes import ServiceProcess
from keeper_devtools.swtpm_lab import (
    DEMO_NV_INDEX,
    manufacture_tpm_state,
    nv_read_secret,
    nv_write_secret,
    write_private_ca_config,
)
from keeper_shared.bus.node_failover import broker_user
from keeper_shared.keeper_client.client import KeeperClient
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import StateKind
from keeper_shared.redis_access.connection import RedisSettings, connect_redis
from keeper_shared.redis_access.keys import hosts_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.keys import (
    SealingPublicKey,
    create_private_key_file,
    load_private_key,
)
from keeper_shared.swtpm import start_swtpm
from keeper_state_store.crypto.encryption import generate_key_file

SECRET_SIZE = 32
STEP_TIMEOUT_S = 60.0


class StoryFailed(RuntimeError):
    """A step of the story did not come true; the message says which and why."""


@dataclass(frozen=True)
class DemoConfig:
    """Where the story runs."""

    amqp_url: str
    """The store's, policy's and the demo's own AMQP URL (the stack's service user)."""
    broker: BrokerAccounts
    """Where each host and the API get their own user (see ``demo.bus_users``)."""
    redis_url: str
    """The store's Redis URL (as its own ACL user where Redis has users)."""
    work_dir: Path
    """Wiped and recreated: hosts, logs, swtpm CA."""
    kek_file: Path
    """Created (0600) when missing; kept across runs so stored state stays readable."""

    @property
    def store_sealing_key_file(self) -> Path:
        """The store's sealing key, beside the KEK: created when missing, kept likewise."""
        return self.kek_file.with_name("store-sealing.key")

    allow_volatile_redis: bool = False
    stability_window_s: float = 0.3
    heartbeat_interval_s: float = 1.0
    policy_redis_url: str | None = None
    """Policy's Redis URL (its own ACL user), which the story also reads the hosts with;
    None: ``redis_url``."""
    api_redis_url: str | None = None
    """The API's Redis URL (its own ACL user): the API and console run beside the services
    while the story plays; None: not started."""
    api_port: int = 28080

    @property
    def policy_redis(self) -> str:
        """Policy's Redis URL."""
        return self.policy_redis_url or self.redis_url


@dataclass
class StoryResult:
    """What the story proved, for the end-to-end test."""

    vm_id: str = ""
    sealed_hash: str = ""
    secret: bytes = field(default=b"", repr=False)
    """The sealed secret, kept so a test can scan every log for it."""
    secret_matches: bool = False
    log_files: list[Path] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)


class Narrator:
    """One clear line per step: what happened, where, the short hash, how long it took."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._started = time.monotonic()
        self._step_started = self._started

    def step(self, where: str, what: str) -> None:
        """Print a finished step and its duration."""
        now = time.monotonic()
        elapsed, took = now - self._started, now - self._step_started
        self._out.write(f"[{elapsed:6.2f}s] {where:<11} {what} ({took:.2f} s)\n")
        self._out.flush()
        self._step_started = now


def _services(
    config: DemoConfig, hosts: list[SimulatedHost], users: DemoBusUsers
) -> list[ServiceProcess]:
    logs = config.work_dir / "logs"
    common = {"KEEPER_LOG_JSON": "true"}
    bus = config.amqp_url
    store_key = SealingPublicKey(load_private_key(config.store_sealing_key_file).public_key())
    services = [
        ServiceProcess(
            "state-store",
            "keeper_state_store",
            {
                **common,
                "KEEPER_STORE_AMQP_URL": bus,
                "KEEPER_STORE_REDIS_URL": config.redis_url,
                "KEEPER_STORE_KEK_FILE": str(config.kek_file),
                "KEEPER_STORE_SEALING_KEY_FILE": str(config.store_sealing_key_file),
                # Each host has its own broker user: what it says of itself is checked.
                "KEEPER_STORE_VERIFY_HOST_IDENTITY": "true",
                "KEEPER_STORE_ALLOW_VOLATILE_REDIS": str(config.allow_volatile_redis).lower(),
                "KEEPER_STORE_LOG_JSON": "true",
            },
            logs / "state-store.log",
        ),
        ServiceProcess(
            "policy",
            "keeper_policy",
            {
                "KEEPER_POLICY_AMQP_URL": bus,
                "KEEPER_POLICY_REDIS_URL": config.policy_redis,
                "KEEPER_POLICY_VERIFY_HOST_IDENTITY": "true",
                "KEEPER_POLICY_LOG_JSON": "true",
                "KEEPER_POLICY_HOST_LOST_AFTER_S": "15",
            },
            logs / "policy.log",
        ),
    ]
    for host in hosts:
        services.append(
            ServiceProcess(
                host.host_id,
                "keeper_host_agent",
                {
                    "KEEPER_HOST_HOST_ID": host.host_id,
                    "KEEPER_HOST_AMQP_URL": users.host_urls[host.host_id],
                    # Commands only from the services' user, never from the API's.
                    "KEEPER_HOST_COMMAND_SENDERS": broker_user([bus]),
                    "KEEPER_HOST_LIBVIRT_URI": host.libvirt_uri,
                    "KEEPER_HOST_SWTPM_ROOT": str(host.swtpm_root),
                    "KEEPER_HOST_NVRAM_DIR": str(host.nvram_dir),
                    "KEEPER_HOST_SNAPSHOT_DIR": str(host.snapshot_dir),
                    "KEEPER_HOST_GENERATION_MARK_FILE": str(host.generation_mark_file),
                    "KEEPER_HOST_SEALING_KEY_FILE": str(host.sealing_key_file),
                    "KEEPER_HOST_STORE_SEALING_KEY": store_key.to_text(),
                    "KEEPER_HOST_STABILITY_WINDOW_S": str(config.stability_window_s),
                    "KEEPER_HOST_HEARTBEAT_INTERVAL_S": str(config.heartbeat_interval_s),
                    "KEEPER_HOST_RESCAN_INTERVAL_S": "2",
                    "KEEPER_HOST_LOG_JSON": "true",
                },
                logs / f"{host.host_id}.log",
            )
        )
    return services


async def _wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = STEP_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if await condition():
            return
        if time.monotonic() > deadline:
            raise StoryFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


async def run_story(
    config: DemoConfig,
    out: TextIO,
    *,
    keep_serving: Callable[[str], Awaitable[None]] | None = None,
) -> StoryResult:
    """Run the whole story; raise StoryFailed (or the underlying error) if any step fails.
    ``keep_serving``: once the story held, the services (and the console, whose URL it is
    given) keep running until it returns, for a person to look around."""
    shutil.rmtree(config.work_dir, ignore_errors=True)
    config.work_dir.mkdir(parents=True)
    if not config.kek_file.exists():
        config.kek_file.parent.mkdir(parents=True, exist_ok=True)
        generate_key_file(config.kek_file)
    if not config.store_sealing_key_file.exists():
        create_private_key_file(config.store_sealing_key_file)
    host_a = SimulatedHost("host-a", config.work_dir / "host-a")
    host_b = SimulatedHost("host-b", config.work_dir / "host-b")
    for host in (host_a, host_b):
        host.create()
    say = Narrator(out)
    result = StoryResult()
    users = await create_bus_users(config.broker, [host_a.host_id, host_b.host_id])
    services = _services(config, [host_a, host_b], users)
    console: tuple[ServiceProcess, str, Path] | None = None
    if config.api_redis_url is not None:
        store_key = SealingPublicKey(load_private_key(config.store_sealing_key_file).public_key())
        console = console_service(
            amqp_url=users.api_url,
            redis_url=config.api_redis_url,
            port=config.api_port,
            store_key=store_key.to_text(),
            work_dir=config.work_dir,
        )
        services.append(console[0])
    result.log_files = [service.log_path for service in services]
    redis = connect_redis(RedisSettings(redis_url=config.policy_redis))
    client: KeeperClient | None = None
    try:
        for service in services:
            await service.start()
        started_at = time.time()
        await _wait_until(
            lambda: _hosts_heard_since(redis, [host_a.host_id, host_b.host_id], started_at),
            "heartbeats from host-a and host-b to reach policy",
        )
        say.step(
            "stack",
            "state-store, policy, host-a and host-b are up; both hosts heartbeat, each as its "
            "own broker user",
        )
        if console is not None:
            _, url, token_file = console
            await _wait_until(lambda: console_answers(url), "the API and console to answer")
            say.step("console", f"{url} while the demo runs (operator token in {token_file})")
        client = await KeeperClient.connect(config.amqp_url, name="demo")
        await _play(config, client, host_a, host_b, say, result)
        if keep_serving is not None and console is not None:
            say.step("console", f"{console[1]} keeps serving the demo's VM until Ctrl-C")
            await keep_serving(console[1])
    finally:
        if client is not None:
            await client.close()
        await redis.aclose()
        for service in reversed(services):
            result.exit_codes[service.name] = await service.stop()
    failed = {name: code for name, code in result.exit_codes.items() if code != 0}
    if failed:
        raise StoryFailed(f"services did not stop cleanly on SIGTERM: {failed}")
    say.step("stack", "every service stopped cleanly on SIGTERM (exit 0)")
    return result


async def _hosts_heard_since(redis: Redis, host_ids: list[str], since: float) -> bool:
    """Policy recorded a heartbeat from each host after ``since`` (records outlive runs).
    Read as policy's Redis user, with the commands policy itself uses (HGET, not HMGET)."""
    records = [await awaited(redis.hget(hosts_key(), host_id)) for host_id in host_ids]
    return all(
        record is not None and json.loads(record)["last_seen"] >= since for record in records
    )


async def _play(
    config: DemoConfig,
    client: KeeperClient,
    host_a: SimulatedHost,
    host_b: SimulatedHost,
    say: Narrator,
    result: StoryResult,
) -> None:
    vm_id = str(uuid.uuid4())
    result.vm_id = vm_id
    spec = VmSpec(vm_id=vm_id, name=f"win11-{vm_id[:8]}", guest_os="windows-11")
    persisted = await client.watch_events("state.persisted.*")

    tpm_xml = await client.enable_tpm(spec)
    say.step("policy", f"TPM approved for {spec.name} ({vm_id[:8]}): {tpm_xml}")

    epoch = await client.start(vm_id, host_a.host_id)
    say.step("host-a", f"VM prepared and started, placement epoch {epoch}")

    # libvirt's part on first start: manufacture the TPM, copy the NVRAM template.
    ca_config = write_private_ca_config(config.work_dir / "swtpm-ca")
    await manufacture_tpm_state(host_a.tpm_dir(vm_id), config=ca_config)
    host_a.create_nvram_from_template(spec.name)
    host_a.firmware_writes_variable(spec.name, 0x1000, secrets.token_bytes(64))
    say.step("host-a", "swtpm_setup manufactured the TPM; firmware wrote its NVRAM")

    secret = secrets.token_bytes(SECRET_SIZE)
    result.secret = secret
    async with await start_swtpm(host_a.tpm_dir(vm_id)) as tpm:
        await nv_write_secret(tpm.tcti, DEMO_NV_INDEX, secret)
    sealed_hash = host_a.tpm_state_hash(vm_id)
    if sealed_hash is None:
        raise StoryFailed("host-a has no TPM state after sealing")
    result.sealed_hash = sealed_hash
    say.step(
        "guest",
        f"sealed a {SECRET_SIZE}-byte secret into NV index {DEMO_NV_INDEX:#x} on host-a "
        f"(state {sealed_hash[:12]})",
    )

    stored = await persisted.wait_for(
        StatePersisted,
        lambda event: event.vm_id == vm_id
        and event.kind is StateKind.TPM
        and event.content_hash == sealed_hash,
        STEP_TIMEOUT_S,
    )
    say.step(
        "state-store",
        f"host-a's change was stable, announced and pulled; persisted as TPM version "
        f"{stored.data.version} ({sealed_hash[:12]}, epoch {stored.data.token.epoch})",
    )

    retrieved = await client.stop(vm_id, StopMode.SHUTDOWN)
    if not retrieved:
        raise StoryFailed("the final state was not retrieved before the destroy")
    if host_a.tpm_dir(vm_id).exists() or host_a.nvram_path(spec.name).exists():
        raise StoryFailed("host-a still holds the VM's TPM or NVRAM after the destroy")
    say.step(
        "host-a",
        "VM shut down; final state retrieved, then domain undefined and local TPM + NVRAM wiped",
    )

    epoch = await client.start(vm_id, host_b.host_id)
    restored_hash = host_b.tpm_state_hash(vm_id)
    if restored_hash != sealed_hash:
        raise StoryFailed(f"host-b's TPM state {restored_hash} is not the sealed {sealed_hash}")
    say.step(
        "host-b",
        f"state fetched from the store and written into place; VM started, epoch {epoch} "
        f"(state {restored_hash[:12]})",
    )

    async with await start_swtpm(host_b.tpm_dir(vm_id)) as tpm:
        read_back = await nv_read_secret(tpm.tcti, DEMO_NV_INDEX, SECRET_SIZE)
    result.secret_matches = secrets.compare_digest(read_back, secret)
    if not result.secret_matches:
        raise StoryFailed("the secret read back on host-b does NOT match the one sealed on host-a")
    say.step(
        "host-b",
        f"swtpm on the restored state read NV index {DEMO_NV_INDEX:#x}: the secret matches",
    )
