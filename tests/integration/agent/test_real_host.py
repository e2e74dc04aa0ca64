"""The host agent on a real hypervisor host: libvirtd with qemu:///system (QEMU under TCG),
OVMF and swtpm, set up and started by ``deploy/local/real-host``, with the state store,
policy and one host agent running as processes against the session's RabbitMQ and Redis.

The main test follows one Windows-11-class VM (UEFI, tpm-crb, no disk) through
start → boot → power-off → start again, and shows on real libvirt what the simulated hosts
only imitate:

- lifecycle events arrive from libvirt's QEMU driver (defined, started, stopped, undefined);
- libvirt starts swtpm and manufactures the TPM, OVMF boots to the UEFI shell (read from the
  serial console; with Secure Boot keys enrolled, to the boot manager) and writes its
  NVRAM; the agent detects both and the store persists exactly what the host holds
  (``state.persisted`` carries the hash computed here from disk);
- a power-off retrieves the final state, and libvirt's own undefine (``--tpm --nvram``)
  removes ``/var/lib/libvirt/swtpm/<uuid>`` and the NVRAM file;
- the next start puts the state back before the domain starts: the files as they appear on
  disk (read the moment they appear, before swtpm or the firmware can touch them) hash to
  the newest persisted versions, libvirt uses them as they are (no re-manufacture), and the
  TPM that runs is the same TPM: its endorsement key (persistent handle 0x81010001, made by
  libvirt's ``swtpm_setup --createek``), read with ``tpm2_readpublic`` from a throwaway
  swtpm on a copy of the state, equals the one of the first run.

The second test does the same with a TPM whose state swtpm encrypts with a libvirt secret
(``<encryption secret='…'/>``, what oVirt and Nova do): the store creates the secret's value
and keeps it sealed, the host defines the secret (private) before the start and removes it
with the domain; the state persisted is the encrypted one, which a swtpm without the secret
cannot load; after the undefine (state and secret gone, as on a new host) the start defines
the secret again and swtpm runs on the restored encrypted state, the same TPM (same
endorsement key, read with the secret's value). The secret's value is in no log and nowhere
in Redis in clear.

The third test defines domains whose TPMs use secrets the keeper did not create: a
readable one the host can ship, a private one it reports as ``tpm.state.stranded``.

The last test restarts libvirtd under a running VM and shows the agent reconnects,
rebuilds its view and still reports the VM's lifecycle.

Every domain this module creates is named ``keeper-rh-<8 hex>``; the module fixture destroys
and undefines any left over, and stops libvirtd and virtlogd if it started them. Test
sessions on one machine take turns (a lock file): there is only one libvirtd to share.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import functools
import json
import os
import re
import secrets
import select
import shutil
import subprocess
import tempfile
import threading
import time
import tty
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import libvirt
import pytest
from pydantic import SecretBytes
from redis.asyncio import Redis

from keeper_devtools.demo.processes import ServiceProcess
from keeper_host_agent.hypervisor.errors import TpmSecretError
from keeper_host_agent.hypervisor.libvirt_secrets import KEEPER_USAGE_PREFIX as KEEPER_SECRET_PREFIX
from keeper_host_agent.hypervisor.libvirt_secrets import define_tpm_secret, read_foreign_secret
from keeper_shared.keeper_client.client import EventWatch, KeeperClient
from keeper_shared.messages.envelope import Envelope, Payload
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.tpm import TpmStateStranded, VmSpec
from keeper_shared.messages.types import StateKind, TpmSecret
from keeper_shared.messages.vm import (
    StopReason,
    VmDefined,
    VmStarted,
    VmStopped,
    VmUndefined,
)
from keeper_shared.redis_access.keys import hosts_key, tpm_secret_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.keys import SealingPublicKey, load_private_key
from keeper_shared.state_format.blobs import content_hash
from keeper_shared.state_format.compression import compress
from keeper_shared.state_format.tpm_archive import (
    MAIN_STATE_FILE_NAME,
    pack_tpm_state,
    read_tpm_state_dir,
)
from keeper_shared.swtpm import SwtpmError, missing_tools, start_swtpm
from keeper_state_store.crypto.key_ring import KeyRing
from keeper_state_store.crypto.tpm_secrets import TpmSecretVault
from keeper_state_store.storage.repository import StateRepository
from support.broker import Broker
from support.leak_scan import content_fingerprints, every_redis_value, find_leaks, leak_forms

pytestmark = [
    pytest.mark.real_host,
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.swtpm,
    # The first test also carries the module's setup, which may install packages.
    pytest.mark.timeout(1200),
]

T = TypeVar("T")
E = TypeVar("E", bound=Payload)

REPO_ROOT = Path(__file__).resolve().parents[3]
REAL_HOST = REPO_ROOT / "deploy" / "local" / "real-host"
LIBVIRT_URI = "qemu:///system"
LIBVIRT_SECRETS_DIR = Path("/etc/libvirt/secrets")
SWTPM_ROOT = Path("/var/lib/libvirt/swtpm")
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")
NAME_PREFIX = "keeper-rh-"
EK_HANDLE = "0x81010001"
HOOK_SOCKET = "/run/keeper/host-agent.sock"

LOCK_FILE = Path(tempfile.gettempdir()) / "keeper-real-host-tests.lock"
LOCK_TIMEOUT_S = 600.0

# Generous bounds: a slow CI machine under TCG may take several times what this one does.
SETUP_TIMEOUT_S = 900.0
DAEMON_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 90.0
BOOT_TIMEOUT_S = 180.0
BOOT_DONE = (b"Shell>", b"No bootable option or device was found")
"""What OVMF prints on the serial console when it has booted as far as a VM without a disk
goes: the UEFI shell's prompt, or, with Secure Boot and enrolled keys (where the unsigned
built-in shell is refused), the boot manager's complaint."""


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI=true: CI must not pass by skipping the real host."""
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: the real-host tests must not skip)")
    pytest.skip(reason)


def real_host_script(
    *args: str, timeout_s: float = DAEMON_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``deploy/local/real-host`` with ``args``; its output is echoed for the record."""
    result = subprocess.run(
        [str(REAL_HOST), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    print(f"\n$ deploy/local/real-host {' '.join(args)} (exit {result.returncode})")
    print((result.stdout + result.stderr).rstrip())
    return result


# --- libvirt, looked at directly (read-only, short connections) ----------------------------


def _libvirt_call(action: Callable[[libvirt.virConnect], T]) -> T:
    libvirt.registerErrorHandler(lambda _ctx, _error: None, None)
    connection = libvirt.open(LIBVIRT_URI)
    try:
        return action(connection)
    finally:
        connection.close()


def _live_xml(vm_id: str) -> str:
    return _libvirt_call(lambda conn: str(conn.lookupByUUIDString(vm_id).XMLDesc(0)))


def _live_tpm_secret_uuid(vm_id: str) -> str:
    """The secret the running domain's TPM names in ``<encryption secret>``."""
    match = re.search(r"<encryption secret='([0-9a-f-]{36})'", _live_xml(vm_id))
    assert match, "the domain's TPM names no encryption secret"
    return match.group(1)


@dataclass(frozen=True)
class LibvirtSecret:
    """A libvirt secret as the daemon shows it through its API."""

    usage_id: str
    private: bool
    value_readable: bool


def _libvirt_secret(secret_uuid: str) -> LibvirtSecret | None:
    def look(conn: libvirt.virConnect) -> LibvirtSecret | None:
        try:
            secret = conn.secretLookupByUUIDString(secret_uuid)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return None
            raise
        try:
            secret.value()
            readable = True
        except libvirt.libvirtError:
            readable = False
        return LibvirtSecret(
            usage_id=str(secret.usageID()),
            private="private='yes'" in secret.XMLDesc(0),
            value_readable=readable,
        )

    return _libvirt_call(look)


def _remove_leftover_domains() -> list[str]:
    """Destroy and undefine (with TPM and NVRAM) every domain this module may have made."""

    def clean(conn: libvirt.virConnect) -> list[str]:
        removed = []
        for domain in conn.listAllDomains(0):
            if not domain.name().startswith(NAME_PREFIX):
                continue
            with contextlib.suppress(libvirt.libvirtError):
                if domain.isActive():
                    domain.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                # A snapshot left by a failed memory-snapshot test would refuse the undefine.
                domain.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                    | libvirt.VIR_DOMAIN_UNDEFINE_TPM
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                )
            removed.append(domain.name())
        for secret in conn.listAllSecrets(0):
            # The keeper's secrets of VMs this module made and did not see through.
            if secret.usageID().startswith(KEEPER_SECRET_PREFIX):
                vm_id = secret.usageID().removeprefix(KEEPER_SECRET_PREFIX)
                if not any(d.UUIDString() == vm_id for d in conn.listAllDomains(0)):
                    with contextlib.suppress(libvirt.libvirtError):
                        secret.undefine()
                    removed.append(f"secret {secret.UUIDString()}")
        return removed

    try:
        return _libvirt_call(clean)
    except libvirt.libvirtError:
        return []


# --- the host's state as it is on disk ---------------------------------------------------


def tpm_dir(vm_id: str) -> Path:
    return SWTPM_ROOT / vm_id / "tpm2"


def nvram_path(name: str) -> Path:
    return NVRAM_DIR / f"{name}_VARS.fd"


def disk_tpm_content(vm_id: str) -> bytes | None:
    """The canonical TPM content (the archive the agent hashes), or None without a permall."""
    try:
        files = read_tpm_state_dir(tpm_dir(vm_id))
    except FileNotFoundError:
        return None
    return pack_tpm_state(files) if MAIN_STATE_FILE_NAME in files else None


def disk_nvram_content(name: str) -> bytes | None:
    try:
        return nvram_path(name).read_bytes()
    except FileNotFoundError:
        return None


def _hash_or_none(content: bytes | None) -> str | None:
    return content_hash(content) if content is not None else None


class RestoreCapture:
    """Reads the TPM state and NVRAM the moment they appear on disk.

    Started when both are gone (after the undefine wiped them), it sees them as the agent's
    ``vm.prepare`` wrote them (temp file, rename), milliseconds later, while the domain is
    not even defined: swtpm only changes the permall once the firmware sends it commands,
    and QEMU only writes the NVRAM when the firmware sets a variable, both seconds later.
    Were either faster, the hashes would differ and the test would fail, never pass wrongly.
    """

    def __init__(self, vm_id: str, name: str) -> None:
        self._vm_id = vm_id
        self._name = name
        self.tpm: bytes | None = None
        self.tpm_files: dict[str, bytes] = {}
        self.nvram: bytes | None = None
        self.started_at = time.monotonic()
        self.tpm_seen_at: float | None = None
        self.nvram_seen_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="restore-capture", daemon=True)

    def start(self) -> None:
        assert disk_tpm_content(self._vm_id) is None
        assert disk_nvram_content(self._name) is None
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        permall = tpm_dir(self._vm_id) / MAIN_STATE_FILE_NAME
        while not self._stop.is_set() and (self.tpm is None or self.nvram is None):
            if self.tpm is None and permall.exists():
                self.tpm_seen_at = time.monotonic()
                self.tpm_files = read_tpm_state_dir(tpm_dir(self._vm_id))
                self.tpm = pack_tpm_state(self.tpm_files)
            if self.nvram is None:
                self.nvram = disk_nvram_content(self._name)
                if self.nvram is not None:
                    self.nvram_seen_at = time.monotonic()
            time.sleep(0.001)


class SerialConsole:
    """The domain's serial console (a pty named in its live XML), read in a thread."""

    def __init__(self, live_xml: str) -> None:
        match = re.search(r"<serial type='pty'>\s*<source path='([^']+)'", live_xml)
        assert match, "the domain has no pty serial console"
        self.path = match.group(1)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._fd)
        self.output = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serial-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self._fd, 65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return  # the domain went away and the pty with it
                if not chunk:
                    return
                self.output += chunk

    async def wait_for_any(self, texts: tuple[bytes, ...], timeout_s: float) -> bytes:
        """Wait until one of ``texts`` was printed; return it."""
        deadline = time.monotonic() + timeout_s
        while True:
            for text in texts:
                if text in self.output:
                    return text
            if time.monotonic() > deadline:
                tail = bytes(self.output[-300:])
                pytest.fail(f"none of {texts} on the console within {timeout_s:.0f} s: {tail!r}")
            await asyncio.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self._fd)


def nvram_template(live_xml: str) -> Path:
    match = re.search(r"<nvram template='([^']+)'", live_xml)
    assert match, "the domain's <nvram> names no template"
    return Path(match.group(1))


async def read_ek_public(state_dir: Path, work_dir: Path, passphrase: bytes | None = None) -> bytes:
    """The EK public area from a throwaway swtpm on a copy of ``state_dir`` (encrypted
    with ``passphrase`` when given)."""
    copy = work_dir / "tpm2"
    shutil.copytree(state_dir, copy)
    out = work_dir / "ek.pub"
    async with await start_swtpm(copy, passphrase=passphrase) as tpm:
        process = await asyncio.create_subprocess_exec(
            "tpm2_readpublic",
            "-c",
            EK_HANDLE,
            "-o",
            str(out),
            env={**os.environ, "TPM2TOOLS_TCTI": tpm.tcti, "TSS2_LOG": "all+NONE"},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await process.communicate()
    assert process.returncode == 0, f"tpm2_readpublic {EK_HANDLE} failed: {stderr.decode()[-300:]}"
    return out.read_bytes()


# --- fixtures --------------------------------------------------------------------------


@dataclass
class RealHost:
    started_here: bool
    start_took_s: float


@contextlib.contextmanager
def exclusive_real_host() -> Iterator[None]:
    """Hold the machine's one libvirtd for this test session: another session running these
    tests at the same time would restart or stop it under this one's VMs."""
    LOCK_FILE.touch(exist_ok=True)
    with LOCK_FILE.open("r+") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session held {LOCK_FILE} for {LOCK_TIMEOUT_S:.0f} s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def real_host() -> Iterator[RealHost]:
    """libvirtd on qemu:///system, set up and started by deploy/local/real-host."""
    with exclusive_real_host():
        yield from _real_host()


def _real_host() -> Iterator[RealHost]:
    setup = real_host_script("setup", timeout_s=SETUP_TIMEOUT_S)
    if setup.returncode != 0:
        _unavailable(f"deploy/local/real-host setup failed: {setup.stderr.strip()[-500:]}")
    missing = missing_tools() + [t for t in ("tpm2_readpublic",) if shutil.which(t) is None]
    if missing:
        _unavailable(f"not installed: {', '.join(missing)}")
    already_running = real_host_script("status").returncode == 0
    started_at = time.monotonic()
    start = real_host_script("start")
    if start.returncode != 0:
        _unavailable(f"deploy/local/real-host start failed: {start.stderr.strip()[-500:]}")
    host = RealHost(started_here=not already_running, start_took_s=time.monotonic() - started_at)
    try:
        yield host
    finally:
        # A test that failed mid-restart may have left libvirtd stopped with a VM running.
        if real_host_script("status").returncode != 0:
            real_host_script("start")
        leftovers = _remove_leftover_domains()
        if leftovers:
            print(f"\nremoved leftover domains: {leftovers}")
        if host.started_here:
            real_host_script("stop")


def _json_lines(path: Path) -> list[dict[str, object]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


@dataclass
class Stack:
    """State store, policy and one host agent on the real host, and a client."""

    host_id: str
    client: KeeperClient
    services: list[ServiceProcess]
    agent: ServiceProcess
    work_dir: Path
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    def agent_log(self) -> list[dict[str, object]]:
        return _json_lines(self.agent.log_path)

    async def wait_logged(self, event: str, since: int, timeout_s: float = STEP_TIMEOUT_S) -> int:
        """Wait for the agent to log ``event`` after line ``since``; return its line index."""
        deadline = time.monotonic() + timeout_s
        while True:
            for index, line in enumerate(self.agent_log()):
                if index >= since and line.get("event") == event:
                    return index
            if not self.agent.running:
                pytest.fail(
                    f"host agent exited ({self.agent.process and self.agent.process.returncode})"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"host agent did not log {event!r} within {timeout_s:.0f} s")
            await asyncio.sleep(0.1)

    async def stop_services(self) -> dict[str, int | None]:
        for service in reversed(self.services):
            if service.name not in self.exit_codes:
                self.exit_codes[service.name] = await service.stop()
        return self.exit_codes


async def _host_heard_since(redis: Redis, host_id: str, since: float) -> bool:
    record = await awaited(redis.hget(hosts_key(), host_id))
    return record is not None and json.loads(record)["last_seen"] >= since


@pytest.fixture
async def stack(
    real_host: RealHost,
    rabbitmq_broker: Broker,
    redis_url: str,
    tmp_path: Path,
    kek_file: Path,
    store_sealing_key_file: Path,
) -> AsyncIterator[Stack]:
    host_id = f"real-{uuid.uuid4().hex[:8]}"
    rabbitmq_url = rabbitmq_broker.url
    # The agent on a user of its own, as in production: the store and policy check it.
    host_password = secrets.token_hex(12)
    rabbitmq_broker.add_user(host_id, host_password)
    logs = tmp_path / "logs"
    agent = ServiceProcess(
        host_id,
        "keeper_host_agent",
        {
            "KEEPER_HOST_HOST_ID": host_id,
            # A cluster of its own: approvals look at this host only, not at the simulated
            # hosts other tests of the session left in Redis (their heartbeats stay fresh
            # for a while, and their test:/// libvirt keeps no secrets).
            "KEEPER_HOST_CLUSTER": host_id,
            "KEEPER_HOST_AMQP_URL": rabbitmq_broker.url_for(host_id, host_password),
            "KEEPER_HOST_LIBVIRT_URI": LIBVIRT_URI,
            "KEEPER_HOST_SWTPM_ROOT": str(SWTPM_ROOT),
            "KEEPER_HOST_NVRAM_DIR": str(NVRAM_DIR),
            "KEEPER_HOST_GENERATION_MARK_FILE": str(tmp_path / "agent" / "generation"),
            "KEEPER_HOST_SEALING_KEY_FILE": str(tmp_path / "agent" / "sealing.key"),
            "KEEPER_HOST_STORE_SEALING_KEY": SealingPublicKey(
                load_private_key(store_sealing_key_file).public_key()
            ).to_text(),
            "KEEPER_HOST_STABILITY_WINDOW_S": "0.3",
            "KEEPER_HOST_HEARTBEAT_INTERVAL_S": "1",
            "KEEPER_HOST_RESCAN_INTERVAL_S": "2",
            "KEEPER_HOST_LOG_JSON": "true",
            # Served for the QEMU hook (test_qemu_hook_real_host.py installs it); harmless
            # without it. Sessions on this machine take turns (the lock), so one path does.
            "KEEPER_HOST_HOOK_SOCKET": HOOK_SOCKET,
            "KEEPER_HOST_HOOK_PREPARE_TIMEOUT_S": "8",
        },
        logs / "host-agent.log",
    )
    services = [
        ServiceProcess(
            "state-store",
            "keeper_state_store",
            {
                "KEEPER_STORE_AMQP_URL": rabbitmq_url,
                "KEEPER_STORE_REDIS_URL": redis_url,
                "KEEPER_STORE_KEK_FILE": str(kek_file),
                "KEEPER_STORE_SEALING_KEY_FILE": str(store_sealing_key_file),
                "KEEPER_STORE_LOG_JSON": "true",
            },
            logs / "state-store.log",
        ),
        ServiceProcess(
            "policy",
            "keeper_policy",
            {
                "KEEPER_POLICY_AMQP_URL": rabbitmq_url,
                "KEEPER_POLICY_REDIS_URL": redis_url,
                "KEEPER_POLICY_LOG_JSON": "true",
            },
            logs / "policy.log",
        ),
        agent,
    ]
    redis = Redis.from_url(redis_url)
    client: KeeperClient | None = None
    try:
        started_at = time.time()
        for service in services:
            await service.start()
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not await _host_heard_since(redis, host_id, started_at):
            if not all(service.running for service in services):
                logs_text = "\n".join(
                    s.log_path.read_text(errors="replace")[-2000:] for s in services
                )
                pytest.fail(
                    f"a service exited before the host's heartbeat was recorded:\n{logs_text}"
                )
            if time.monotonic() > deadline:
                pytest.fail("policy recorded no heartbeat from the real host")
            await asyncio.sleep(0.1)
        print(
            f"\nstack up, {host_id} heartbeat recorded {time.time() - started_at:.1f} s after exec"
        )
        client = await KeeperClient.connect(rabbitmq_url, name="real-host-test")
        yield Stack(host_id, client, services, agent, tmp_path)
    finally:
        if client is not None:
            await client.close()
        await redis.aclose()
        for service in reversed(services):
            await service.stop()


# --- helpers over the event stream -------------------------------------------------------


async def wait_event(
    watch: EventWatch, event_type: type[E], matches: Callable[[E], bool], what: str
) -> Envelope[E]:
    try:
        return await watch.wait_for(event_type, matches, STEP_TIMEOUT_S)
    except TimeoutError:
        pytest.fail(f"no {what} within {STEP_TIMEOUT_S:.0f} s")


async def wait_persisted_current(
    watch: EventWatch,
    vm_id: str,
    kind: StateKind,
    current: Callable[[], bytes | None],
    accept: Callable[[bytes], bool] = lambda _content: True,
    timeout_s: float = BOOT_TIMEOUT_S,
) -> tuple[Envelope[StatePersisted], bytes]:
    """Wait until the store announced as persisted exactly what the host holds right now
    (and ``accept`` likes it); return that event and the content read from disk."""
    deadline = time.monotonic() + timeout_s
    while True:
        content = await asyncio.to_thread(current)
        if content is not None and accept(content):
            digest = content_hash(content)

            def persisted_now(event: StatePersisted, digest: str = digest) -> bool:
                return event.vm_id == vm_id and event.kind is kind and event.content_hash == digest

            with contextlib.suppress(TimeoutError):
                return await watch.wait_for(StatePersisted, persisted_now, 1.0), content
        else:
            await asyncio.sleep(0.2)
        if time.monotonic() > deadline:
            pytest.fail(
                f"the host's current {kind} of {vm_id} was not persisted in {timeout_s:.0f} s"
            )


def newest_persisted(watch: EventWatch, vm_id: str, kind: StateKind) -> StatePersisted:
    versions = watch.matching(StatePersisted, lambda e: e.vm_id == vm_id and e.kind is kind)
    assert versions, f"no {kind} version persisted for {vm_id}"
    return max((envelope.data for envelope in versions), key=lambda data: data.version)


def lifecycle(watch: EventWatch, vm_id: str) -> list[str]:
    """The lifecycle facts the agent published for ``vm_id``, in the order it sent them."""
    kinds: list[tuple[type[Payload], str]] = [
        (VmDefined, "defined"),
        (VmStarted, "started"),
        (VmStopped, "stopped"),
        (VmUndefined, "undefined"),
    ]
    seen: list[tuple[float, str]] = []
    for event_type, label in kinds:
        for envelope in watch.matching(event_type, lambda e: getattr(e, "vm_id", None) == vm_id):
            seen.append((envelope.time.timestamp(), label))
    return [label for _time, label in sorted(seen)]


async def timed(awaitable: Awaitable[T]) -> tuple[T, float]:
    started = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - started


def kib(size: int) -> str:
    return f"{size:,} B" if size < 10_000 else f"{size / 1024:,.1f} KiB"


# --- the tests -----------------------------------------------------------------------------


async def test_tpm_and_nvram_survive_power_off_and_restart_on_a_real_libvirt_host(
    real_host: RealHost, stack: Stack, tmp_path: Path
) -> None:
    client, host = stack.client, stack.host_id
    vm_id = str(uuid.uuid4())
    name = f"{NAME_PREFIX}{vm_id[:8]}"
    spec = VmSpec(vm_id=vm_id, name=name, guest_os="windows-11")
    figures: list[str] = [
        f"libvirtd ready in {real_host.start_took_s:.1f} s (started here: {real_host.started_here})"
    ]

    def is_ours(event: Payload) -> bool:
        return getattr(event, "vm_id", None) == vm_id

    # --- first start: libvirt manufactures the TPM, OVMF boots and writes its NVRAM
    run1 = await client.watch_events("vm.*.*", "state.persisted.*")
    tpm_xml = await client.enable_tpm(spec, cluster=host)
    assert "tpm-crb" in tpm_xml
    wall_start = time.time()
    epoch1, took = await timed(client.start(vm_id, host))
    figures.append(f"first start (prepare nothing, define, start): {took:.2f} s, epoch {epoch1}")
    await wait_event(run1, VmStarted, is_ours, "vm.started from the real host")
    live_xml = _live_xml(vm_id)
    template_hash = content_hash(nvram_template(live_xml).read_bytes())
    console = SerialConsole(live_xml)
    try:
        seen = await console.wait_for_any(BOOT_DONE, BOOT_TIMEOUT_S)
        figures.append(
            f"first boot: {seen.decode()!r} on the serial console "
            f"{time.time() - wall_start:.1f} s after the start request"
        )
    finally:
        console.close()

    tpm1_event, tpm1 = await wait_persisted_current(
        run1, vm_id, StateKind.TPM, lambda: disk_tpm_content(vm_id)
    )
    nvram1_event, nvram1 = await wait_persisted_current(
        run1,
        vm_id,
        StateKind.NVRAM,
        lambda: disk_nvram_content(name),
        accept=lambda content: content_hash(content) != template_hash,
    )
    first_tpm = min(
        run1.matching(StatePersisted, lambda e: is_ours(e) and e.kind is StateKind.TPM),
        key=lambda envelope: envelope.data.version,
    )
    firmware_nvram = [
        envelope
        for envelope in run1.matching(
            StatePersisted, lambda e: is_ours(e) and e.kind is StateKind.NVRAM
        )
        if envelope.data.content_hash != template_hash
    ]
    all_nvram = run1.matching(StatePersisted, lambda e: is_ours(e) and e.kind is StateKind.NVRAM)
    figures.append(
        f"start → TPM persisted (libvirt-manufactured, v{first_tpm.data.version}): "
        f"{first_tpm.time.timestamp() - wall_start:.1f} s"
    )
    figures.append(
        f"start → first firmware-written NVRAM persisted: "
        f"{min(e.time.timestamp() for e in firmware_nvram) - wall_start:.1f} s; "
        f"{len(all_nvram)} NVRAM version(s) persisted during the first boot"
    )
    permall1 = read_tpm_state_dir(tpm_dir(vm_id))[MAIN_STATE_FILE_NAME]
    figures.append(
        f"TPM: permall {kib(len(permall1))}, canonical archive {kib(len(tpm1))}, "
        f"compressed {kib(len(compress(tpm1)))}"
    )
    figures.append(
        f"NVRAM: {kib(len(nvram1))} ({len(nvram1):,} B), compressed {kib(len(compress(nvram1)))}"
    )
    assert tpm1_event.data.token.epoch == epoch1
    assert nvram1_event.data.token.epoch == epoch1
    assert tpm1_event.data.host == host

    # The TPM as the first run knew it, for the identity check at the end.
    saved_run1 = tmp_path / "run1-tpm2"
    shutil.copytree(tpm_dir(vm_id), saved_run1, ignore=shutil.ignore_patterns(".*"))

    # --- power-off: the final state is retrieved, then libvirt removes TPM and NVRAM
    retrieved, took = await timed(client.stop(vm_id, StopMode.POWEROFF))
    assert retrieved, "the final state was not retrieved before the destroy"
    figures.append(f"power-off (retrieve, destroy, undefine --tpm --nvram): {took:.2f} s")
    stopped = await wait_event(run1, VmStopped, is_ours, "vm.stopped")
    assert stopped.data.reason is StopReason.DESTROYED
    await wait_event(run1, VmUndefined, is_ours, "vm.undefined")
    assert not (SWTPM_ROOT / vm_id).exists(), "libvirt left the swtpm state directory"
    assert not nvram_path(name).exists(), "libvirt left the NVRAM file"
    assert lifecycle(run1, vm_id)[:2] == ["defined", "started"]
    assert lifecycle(run1, vm_id)[-2:] == ["stopped", "undefined"]

    # --- second start: the store's state goes back before the domain starts
    newest_tpm = newest_persisted(run1, vm_id, StateKind.TPM)
    newest_nvram = newest_persisted(run1, vm_id, StateKind.NVRAM)
    run2 = await client.watch_events("vm.*.*", "state.persisted.*")
    capture = RestoreCapture(vm_id, name)
    capture.start()
    wall_start = time.time()
    try:
        epoch2, took = await timed(client.start(vm_id, host))
    finally:
        capture.stop()
    assert epoch2 > epoch1
    figures.append(f"second start (restore from the store, prepare, define, start): {took:.2f} s")
    assert capture.tpm is not None, "prepare wrote no TPM state"
    assert capture.nvram is not None, "prepare wrote no NVRAM"
    assert content_hash(capture.tpm) == newest_tpm.content_hash, (
        "the TPM state written before the start is not the newest persisted version"
    )
    assert content_hash(capture.nvram) == newest_nvram.content_hash, (
        "the NVRAM written before the start is not the newest persisted version"
    )
    assert set(capture.tpm_files) == {MAIN_STATE_FILE_NAME}
    assert capture.tpm_seen_at is not None
    assert capture.nvram_seen_at is not None
    figures.append(
        f"restored files appeared {capture.tpm_seen_at - capture.started_at:.2f} s (TPM) and "
        f"{capture.nvram_seen_at - capture.started_at:.2f} s (NVRAM) after the start request"
    )
    figures.append(
        f"restored on disk = newest persisted: TPM v{newest_tpm.version} "
        f"({newest_tpm.content_hash[:12]}), NVRAM v{newest_nvram.version} "
        f"({newest_nvram.content_hash[:12]})"
    )
    await wait_event(run2, VmStarted, is_ours, "vm.started after the restore")
    console = SerialConsole(_live_xml(vm_id))
    try:
        seen = await console.wait_for_any(BOOT_DONE, BOOT_TIMEOUT_S)
        figures.append(
            f"second boot: {seen.decode()!r} {time.time() - wall_start:.1f} s after the start "
            "request"
        )
    finally:
        console.close()
    # The firmware used the restored TPM (its permall moved) and that state is persisted.
    tpm2_event, tpm2 = await wait_persisted_current(
        run2,
        vm_id,
        StateKind.TPM,
        lambda: disk_tpm_content(vm_id),
        accept=lambda content: content != capture.tpm,
    )
    assert tpm2_event.data.token.epoch == epoch2
    saved_run2 = tmp_path / "run2-tpm2"
    shutil.copytree(tpm_dir(vm_id), saved_run2, ignore=shutil.ignore_patterns(".*"))
    assert content_hash(pack_tpm_state(read_tpm_state_dir(saved_run2))) == content_hash(tpm2)

    # --- the same TPM: its endorsement key is the first run's
    ek_run1 = await read_ek_public(saved_run1, tmp_path / "ek1")
    ek_run2 = await read_ek_public(saved_run2, tmp_path / "ek2")
    assert ek_run1 == ek_run2, "the TPM running after the restore has another endorsement key"
    figures.append(
        f"EK public ({EK_HANDLE}, {len(ek_run1)} B) identical in both runs: "
        f"{content_hash(ek_run1)[:16]}"
    )

    # --- final power-off, and the services stop cleanly
    retrieved, _ = await timed(client.stop(vm_id, StopMode.POWEROFF))
    assert retrieved
    await wait_event(run2, VmUndefined, is_ours, "vm.undefined after the final power-off")
    assert lifecycle(run2, vm_id) == ["defined", "started", "stopped", "undefined"]
    assert not (SWTPM_ROOT / vm_id).exists()
    assert not nvram_path(name).exists()
    assert (
        _libvirt_call(lambda conn: [d.name() for d in conn.listAllDomains(0) if d.name() == name])
        == []
    )

    codes = await stack.stop_services()
    assert set(codes.values()) == {0}, codes
    written = [(str(s.log_path), s.log_path.read_bytes()) for s in stack.services]
    for log_name, data in written:
        assert b"Traceback" not in data, log_name
    assert find_leaks(written, content_fingerprints(permall1)) == []

    print("\nreal host figures:")
    for line in figures:
        print(f"  - {line}")


async def test_encrypted_tpm_state_moves_with_its_libvirt_secret(
    real_host: RealHost, stack: Stack, redis_url: str, kek_file: Path, tmp_path: Path
) -> None:
    client, host = stack.client, stack.host_id
    vm_id = str(uuid.uuid4())
    name = f"{NAME_PREFIX}{vm_id[:8]}"
    spec = VmSpec(vm_id=vm_id, name=name, guest_os="windows-11", encrypt_tpm_state=True)
    figures: list[str] = []

    def is_ours(event: Payload) -> bool:
        return getattr(event, "vm_id", None) == vm_id

    # --- first start: the store makes the secret, the host defines it, swtpm encrypts
    run1 = await client.watch_events("vm.*.*", "state.persisted.*", "tpm.state.*.*")
    began = time.monotonic()
    await client.enable_tpm(spec, cluster=host)
    await client.start(vm_id, host)
    await wait_event(run1, VmStarted, is_ours, "vm.started of the encrypted-TPM VM")
    secret_uuid = _live_tpm_secret_uuid(vm_id)
    secret = _libvirt_secret(secret_uuid)
    assert secret is not None, "the host did not define the secret before the start"
    assert secret.usage_id == f"{KEEPER_SECRET_PREFIX}{vm_id}"
    assert secret.private
    assert not secret.value_readable
    # The daemon keeps the value on disk; the store's sealed copy must be the same value.
    value = base64.b64decode((LIBVIRT_SECRETS_DIR / f"{secret_uuid}.base64").read_bytes())
    stored = await stored_tpm_secret(redis_url, kek_file, vm_id)
    assert stored is not None
    assert stored.uuid == secret_uuid
    assert stored.value.get_secret_value() == value

    tpm1_event, tpm1 = await wait_persisted_current(
        run1, vm_id, StateKind.TPM, lambda: disk_tpm_content(vm_id), timeout_s=STEP_TIMEOUT_S
    )
    figures.append(
        f"encrypted TPM persisted {time.monotonic() - began:.1f} s after the enable request "
        f"(v{tpm1_event.data.version}, canonical archive {kib(len(tpm1))})"
    )
    # Encrypted for real: swtpm loads the state persisted only with the secret's value.
    copy = tmp_path / "encrypted" / "tpm2"
    shutil.copytree(tpm_dir(vm_id), copy, ignore=shutil.ignore_patterns(".*"))
    with pytest.raises(SwtpmError, match="GetDecryptedData"):
        await start_swtpm(copy)
    ek_run1 = await read_ek_public(copy, tmp_path / "ek1", passphrase=value)

    # --- power-off: state retrieved, domain undefined, state and secret gone (a new host)
    assert await client.stop(vm_id, StopMode.POWEROFF)
    await wait_event(run1, VmUndefined, is_ours, "vm.undefined of the encrypted-TPM VM")
    assert not (SWTPM_ROOT / vm_id).exists()
    assert _libvirt_secret(secret_uuid) is None, "the secret outlived its domain on the host"
    newest_tpm = newest_persisted(run1, vm_id, StateKind.TPM)

    # --- start again from the store: the secret comes back first, swtpm reads the state
    run2 = await client.watch_events("vm.*.*", "state.persisted.*", "tpm.state.*.*")
    capture = RestoreCapture(vm_id, name)
    capture.start()
    try:
        await client.start(vm_id, host)
    finally:
        capture.stop()
    await wait_event(run2, VmStarted, is_ours, "vm.started after the encrypted restore")
    assert capture.tpm is not None, "prepare wrote no TPM state"
    assert content_hash(capture.tpm) == newest_tpm.content_hash
    assert _live_tpm_secret_uuid(vm_id) == secret_uuid
    again = _libvirt_secret(secret_uuid)
    assert again is not None
    assert again.private
    assert base64.b64decode((LIBVIRT_SECRETS_DIR / f"{secret_uuid}.base64").read_bytes()) == value
    # The firmware's first TPM commands make swtpm decrypt, change and re-encrypt the state.
    tpm2_event, _ = await wait_persisted_current(
        run2,
        vm_id,
        StateKind.TPM,
        lambda: disk_tpm_content(vm_id),
        accept=lambda content: content != capture.tpm,
        timeout_s=STEP_TIMEOUT_S,
    )
    figures.append(
        f"restored encrypted TPM v{newest_tpm.version} ({newest_tpm.content_hash[:12]}) "
        f"used by swtpm and changed: v{tpm2_event.data.version} persisted"
    )
    assert run2.matching(TpmStateStranded, is_ours) == []
    # The same TPM: the endorsement key read from the state the restored run wrote.
    saved_run2 = tmp_path / "run2-tpm2"
    shutil.copytree(tpm_dir(vm_id), saved_run2, ignore=shutil.ignore_patterns(".*"))
    ek_run2 = await read_ek_public(saved_run2, tmp_path / "ek2", passphrase=value)
    assert ek_run1 == ek_run2, "the restored encrypted TPM has another endorsement key"

    assert await client.stop(vm_id, StopMode.POWEROFF)
    await wait_event(run2, VmUndefined, is_ours, "vm.undefined after the final power-off")
    assert _libvirt_secret(secret_uuid) is None

    # --- the value is in no log line and nowhere in Redis in clear
    codes = await stack.stop_services()
    assert set(codes.values()) == {0}, codes
    needles = leak_forms(value)
    written = [(str(s.log_path), s.log_path.read_bytes()) for s in stack.services]
    assert find_leaks(written, needles) == []
    redis = Redis.from_url(redis_url)
    try:
        values = [(key.decode(), data) async for key, data in every_redis_value(redis)]
    finally:
        await redis.aclose()
    assert any(key == tpm_secret_key(vm_id) for key, _ in values), "the store kept no secret"
    assert find_leaks(values, needles) == []
    figures.append(f"whole encrypted cycle: {time.monotonic() - began:.1f} s")
    print("\nencrypted TPM figures:")
    for line in figures:
        print(f"  - {line}")


async def stored_tpm_secret(redis_url: str, kek_file: Path, vm_id: str) -> TpmSecret | None:
    """The VM's secret as the store holds it, opened with the store's own key file."""
    redis = Redis.from_url(redis_url)
    try:
        repository = StateRepository(redis, KeyRing.from_files(kek_file), history_depth=1)
        return await TpmSecretVault(repository).held(vm_id)
    finally:
        await redis.aclose()


async def test_a_tpm_secret_the_keeper_did_not_create_is_read_or_reported(
    real_host: RealHost, stack: Stack
) -> None:
    """Domains defined outside the keeper with their own secrets (as oVirt or Nova make
    them): a readable one the host can ship to the store; a private one it cannot, and it
    says so with ``tpm.state.stranded`` instead of failing silently."""
    watch = await stack.client.watch_events("tpm.state.*.*", "vm.*.*")
    made: dict[str, tuple[str, str]] = {}
    readable_value = secrets.token_urlsafe(32).encode()
    try:
        for private in (True, False):
            vm_id, secret_uuid = str(uuid.uuid4()), str(uuid.uuid4())
            made["private" if private else "readable"] = (vm_id, secret_uuid)
            value = secrets.token_urlsafe(32).encode() if private else readable_value
            _libvirt_call(
                functools.partial(
                    _define_foreign,
                    vm_id=vm_id,
                    secret_uuid=secret_uuid,
                    value=value,
                    private=private,
                )
            )

        private_vm, private_secret = made["private"]
        stranded = await wait_event(
            watch,
            TpmStateStranded,
            lambda event: event.vm_id == private_vm,
            "tpm.state.stranded for the private secret",
        )
        assert stranded.data.secret_uuid == private_secret
        assert stranded.data.host == stack.host_id
        assert "private" in stranded.data.reason

        readable_vm, readable_secret = made["readable"]
        await wait_event(
            watch, VmDefined, lambda e: e.vm_id == readable_vm, "vm.defined (readable)"
        )
        shipped = _libvirt_call(lambda c: read_foreign_secret(c, readable_vm, readable_secret))
        assert shipped is not None
        assert shipped.uuid == readable_secret
        assert shipped.value.get_secret_value() == readable_value
        assert watch.matching(TpmStateStranded, lambda e: e.vm_id == readable_vm) == []

        # Prepared again on this host with the value the store kept: the other manager's
        # secret is left as it is; one claiming another value is refused, not overwritten.
        assert not _libvirt_call(lambda c: define_tpm_secret(c, readable_vm, shipped))
        forged = TpmSecret(uuid=readable_secret, value=SecretBytes(b"another value"))
        with pytest.raises(TpmSecretError, match="another value"):
            _libvirt_call(lambda c: define_tpm_secret(c, readable_vm, forged))
        assert _libvirt_call(lambda c: read_foreign_secret(c, readable_vm, readable_secret)) == (
            shipped
        )
    finally:
        _libvirt_call(lambda conn: _remove_foreign(conn, list(made.values())))
    codes = await stack.stop_services()
    assert set(codes.values()) == {0}, codes


def _define_foreign(
    conn: libvirt.virConnect, *, vm_id: str, secret_uuid: str, value: bytes, private: bool
) -> None:
    """A vtpm secret and a (stopped) domain whose TPM is encrypted with it, made the way a
    manager other than the keeper would."""
    secret = conn.secretDefineXML(
        f"<secret ephemeral='no' private='{'yes' if private else 'no'}'>"
        f"<uuid>{secret_uuid}</uuid><usage type='vtpm'><name>other-{vm_id}</name></usage>"
        "</secret>"
    )
    secret.setValue(value)
    conn.defineXML(
        f"<domain type='qemu'><name>{NAME_PREFIX}{vm_id[:8]}</name><uuid>{vm_id}</uuid>"
        "<memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
        "<devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'>"
        f"<encryption secret='{secret_uuid}'/></backend></tpm></devices></domain>"
    )


def _remove_foreign(conn: libvirt.virConnect, made: list[tuple[str, str]]) -> None:
    for vm_id, secret_uuid in made:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByUUIDString(vm_id).undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_TPM)
        with contextlib.suppress(libvirt.libvirtError):
            conn.secretLookupByUUIDString(secret_uuid).undefine()


async def test_agent_reconnects_when_libvirtd_restarts(real_host: RealHost, stack: Stack) -> None:
    status = real_host_script("status")
    if not re.search(r"libvirtd runs \(pid \d+, started by real-host\)", status.stdout):
        _unavailable("libvirtd was not started by deploy/local/real-host; not restarting it")
    client, host = stack.client, stack.host_id
    vm_id = str(uuid.uuid4())
    name = f"{NAME_PREFIX}{vm_id[:8]}"
    watch = await client.watch_events("vm.*.*", "state.persisted.*")

    def is_ours(event: Payload) -> bool:
        return getattr(event, "vm_id", None) == vm_id

    await client.enable_tpm(VmSpec(vm_id=vm_id, name=name, guest_os="windows-11"), cluster=host)
    await client.start(vm_id, host)
    await wait_event(watch, VmStarted, is_ours, "vm.started")
    await wait_persisted_current(watch, vm_id, StateKind.TPM, lambda: disk_tpm_content(vm_id))
    qemu_pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())

    # libvirtd goes away under the running VM, then comes back.
    mark = len(stack.agent_log())
    stopped_at = time.monotonic()
    assert real_host_script("stop", "libvirtd").returncode == 0
    await stack.wait_logged("libvirt connection lost", mark)
    os.kill(qemu_pid, 0)  # QEMU runs on without libvirtd
    assert real_host_script("start").returncode == 0
    reconnected = await stack.wait_logged("libvirt reconnected", mark)
    rebuilt = await stack.wait_logged("view rebuilt", reconnected)
    view = stack.agent_log()[rebuilt]
    assert view.get("vms") == 1, view
    print(
        f"\nagent reconnected and rebuilt its view "
        f"{time.monotonic() - stopped_at:.1f} s after libvirtd was stopped"
    )

    # The agent still hears libvirt: a power-off is retrieved and reported as before.
    retrieved = await client.stop(vm_id, StopMode.POWEROFF)
    assert retrieved
    stopped = await wait_event(watch, VmStopped, is_ours, "vm.stopped after the libvirtd restart")
    assert stopped.data.reason is StopReason.DESTROYED
    await wait_event(watch, VmUndefined, is_ours, "vm.undefined after the libvirtd restart")
    assert not (SWTPM_ROOT / vm_id).exists()

    codes = await stack.stop_services()
    assert set(codes.values()) == {0}, codes
