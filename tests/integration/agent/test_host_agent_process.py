"""The host agent as it runs in production: ``python -m keeper_host_agent``, configured from
``KEEPER_HOST_*`` environment variables, talking to a real RabbitMQ node, with libvirt's
``test:///`` driver as its simulated hypervisor.

- it comes up ("host agent ready"), and SIGTERM stops it cleanly: exit code 0 within
  20 s, every log line JSON, no traceback;
- over the bus it carries out prepare, start, fetch, power-off and undefine, and publishes
  the lifecycle facts, the state it was given (as hashes, under the placement epoch), and
  heartbeats with its inventory.

The process is always killed in a ``finally``, whatever the test did.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keeper_devtools.swtpm_lab import permall_framing
from keeper_host_agent.detect.inline_state import InlineBudget, sealed_size
from keeper_policy.placement.domain_definition import domain_xml
from keeper_shared.bus.topology import host_command_key
from keeper_shared.messages.commands import ReplyT
from keeper_shared.messages.host import HostHeartbeat
from keeper_shared.messages.replies import (
    PowerOffVmReply,
    PrepareVmReply,
    StartVmReply,
    UndefineVmReply,
)
from keeper_shared.messages.state import FetchState, StateChanged, StateFetched
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.messages.vm import (
    PowerOffVm,
    PrepareVm,
    StartVm,
    StopReason,
    UndefineVm,
    VmStarted,
    VmStopped,
    VmUndefined,
)
from keeper_shared.sealing.keys import SealingPrivateKeys, SealingPublicKey
from keeper_shared.sealing.state_blobs import open_state_blob, seal_state_blob
from keeper_shared.state_format.blobs import content_hash, open_blob, seal_blob
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from support.bus_clients import ConnectBus
from support.events import EventRecorder
from support.sealing_keys import host_key_environment, new_keys

pytestmark = [pytest.mark.libvirt, pytest.mark.rabbit]

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 30.0
VM_ID = "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"
VM_NAME = "process-vm"


@dataclass
class AgentProcess:
    """A running ``python -m keeper_host_agent`` and where its output goes."""

    host_id: str
    swtpm_root: Path
    nvram_dir: Path
    store_keys: SealingPrivateKeys
    """The store's keys: the agent seals its fetch replies to their public half."""
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    started_at: float = field(default_factory=time.monotonic)

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def log_events(self) -> list[dict[str, object]]:
        """The JSON log lines on stderr; fails the test on a line that is not JSON."""
        lines = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"stderr line is not JSON: {line[:200]!r}")
        return lines

    def has_logged(self, event: str) -> bool:
        return f'"{event}"' in self.stderr_path.read_text(errors="replace")

    def wait_ready(self) -> float:
        """Block until "host agent ready" (or the process dies); return seconds it took."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.has_logged("host agent ready"):
            if self.process.poll() is not None:
                pytest.fail(f"agent exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"agent not ready within {READY_TIMEOUT_S:.0f} s:\n{self.output()}")
            time.sleep(0.05)
        return time.monotonic() - self.started_at

    def stop(self) -> tuple[int, float]:
        """SIGTERM, then wait for the exit; return the exit code and how long it took."""
        sent_at = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agent still running {STOP_TIMEOUT_S:.0f} s after SIGTERM")
        return code, time.monotonic() - sent_at


@pytest.fixture
def agent_process(tmp_path: Path, rabbitmq_url: str) -> Iterator[AgentProcess]:
    """Start a host agent on its own simulated host; kill it at the end in any case."""
    host_id = f"host-p-{uuid.uuid4().hex[:8]}"
    swtpm_root = tmp_path / "swtpm"
    nvram_dir = tmp_path / "nvram"
    swtpm_root.mkdir()
    nvram_dir.mkdir()
    node = tmp_path / "node.xml"
    node.write_text("<node>\n</node>\n")
    store_keys = new_keys()
    env = {
        **host_key_environment(tmp_path, store_keys.public),
        **{k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")},
        "KEEPER_HOST_HOST_ID": host_id,
        "KEEPER_HOST_AMQP_URL": rabbitmq_url,
        "KEEPER_HOST_LIBVIRT_URI": f"test://{node}",
        "KEEPER_HOST_SWTPM_ROOT": str(swtpm_root),
        "KEEPER_HOST_NVRAM_DIR": str(nvram_dir),
        "KEEPER_HOST_LOG_JSON": "true",
        "KEEPER_HOST_STABILITY_WINDOW_S": "0.2",
        "KEEPER_HOST_HEARTBEAT_INTERVAL_S": "1",
        "KEEPER_HOST_RESCAN_INTERVAL_S": "2",
        "KEEPER_HOST_SHUTDOWN_GRACE_S": "5",
        # The opt-in, so that the process shows it sealing state inline from its settings.
        "KEEPER_HOST_INLINE_STATE_MAX_BYTES": str(InlineBudget().per_event_bytes),
    }
    stdout_path = tmp_path / "agent.stdout"
    stderr_path = tmp_path / "agent.stderr"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "keeper_host_agent"],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=tmp_path,
        )
    agent = AgentProcess(
        host_id, swtpm_root, nvram_dir, store_keys, process, stdout_path, stderr_path
    )
    try:
        yield agent
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def assert_clean_exit(agent: AgentProcess) -> None:
    code, took = agent.stop()
    output = agent.output()
    assert code == 0, f"exit code {code}:\n{output}"
    assert "Traceback" not in output
    events = [line.get("event") for line in agent.log_events()]
    assert "stopping" in events
    assert events[-1] == "stopped"
    print(f"\nagent stopped {1000 * took:.0f} ms after SIGTERM")


def test_agent_starts_and_stops_cleanly_on_sigterm(agent_process: AgentProcess) -> None:
    took = agent_process.wait_ready()
    print(f"\nagent ready {took:.2f} s after exec")
    ready = [e for e in agent_process.log_events() if e.get("event") == "host agent ready"]
    assert len(ready) == 1
    assert ready[0].get("vms") == 0
    assert_clean_exit(agent_process)


async def test_agent_process_serves_commands_and_publishes_events(
    agent_process: AgentProcess, rabbitmq_url: str, connect_bus: ConnectBus
) -> None:
    await asyncio.to_thread(agent_process.wait_ready)
    host_id = agent_process.host_id
    bus = await connect_bus(source="test/driver", origin="test-driver")
    # Every event this host publishes (its events' routing keys end in its id).
    tap = await EventRecorder.start(rabbitmq_url, f"#.{host_id}", name="test/driver events")
    try:

        async def call(
            payload: PrepareVm | StartVm | PowerOffVm | UndefineVm, reply_type: type[ReplyT]
        ) -> ReplyT:
            reply = await bus.call(
                host_command_key(host_id),
                payload,
                reply_type,
                subject=VM_ID,
                timeout_s=CALL_TIMEOUT_S,
            )
            return reply.data

        permall = permall_framing(os.urandom(6_000))
        nvram = os.urandom(540_672)
        tpm = seal_blob(
            StateKind.TPM,
            pack_tpm_state({MAIN_STATE_FILE_NAME: permall}),
            FencingToken(epoch=1, generation=1),
        )
        nvram_blob = seal_blob(StateKind.NVRAM, nvram, FencingToken(epoch=1, generation=1))

        # The store learns the host's key from its heartbeat, made on the agent's first start.
        beat = await tap.wait_for(HostHeartbeat, timeout_s=CALL_TIMEOUT_S)
        assert beat.data.sealing_key is not None
        host_key = SealingPublicKey.from_text(beat.data.sealing_key)
        prepared = await call(
            PrepareVm(
                vm_id=VM_ID,
                name=VM_NAME,
                epoch=2,
                tpm=seal_state_blob(VM_ID, tpm, host_key, command_epoch=2),
                nvram=seal_state_blob(VM_ID, nvram_blob, host_key, command_epoch=2),
            ),
            PrepareVmReply,
        )
        assert prepared.ok, prepared.error
        tpm_dir = agent_process.swtpm_root / VM_ID / "tpm2"
        assert (tpm_dir / MAIN_STATE_FILE_NAME).read_bytes() == permall

        xml = domain_xml(
            VmSpec(vm_id=VM_ID, name=VM_NAME, guest_os="windows-11"),
            tpm_xml="<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>",
            epoch=2,
            ovmf_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
            ovmf_vars_template=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
        )
        wrong_epoch = await call(StartVm(vm_id=VM_ID, epoch=3, domain_xml=xml), StartVmReply)
        assert not wrong_epoch.ok
        started = await call(StartVm(vm_id=VM_ID, epoch=2, domain_xml=xml), StartVmReply)
        assert started.ok, started.error

        await tap.wait_for(VmStarted, timeout_s=CALL_TIMEOUT_S)
        changed = await tap.wait_for_count(StateChanged, 1, timeout_s=CALL_TIMEOUT_S)
        while sum(len(seen.data.changes) for seen in changed) < 2:
            # TPM and NVRAM are announced together when found stable in the same turn.
            changed = await tap.wait_for_count(
                StateChanged, len(changed) + 1, timeout_s=CALL_TIMEOUT_S
            )
        events = [seen.data for seen in changed]
        by_kind = {c.kind: c for event in events for c in event.changes}
        assert by_kind[StateKind.TPM].content_hash == tpm.content_hash
        assert by_kind[StateKind.NVRAM].content_hash == content_hash(nvram)
        assert all(c.token.epoch == 2 for c in by_kind.values())
        assert all(event.host == host_id for event in events)

        fetched = await bus.call(
            host_command_key(host_id),
            FetchState(vm_ids=[VM_ID]),
            StateFetched,
            subject=VM_ID,
            timeout_s=CALL_TIMEOUT_S,
        )
        (sealed_state,) = fetched.data.vms
        blobs = {
            blob.kind: open_state_blob(VM_ID, blob, agent_process.store_keys)
            for blob in sealed_state.blobs
        }
        assert open_blob(blobs[StateKind.TPM]) == pack_tpm_state({MAIN_STATE_FILE_NAME: permall})
        assert open_blob(blobs[StateKind.NVRAM]) == nvram
        # The TPM state travelled inline, sealed to the store, the very blob the fetch
        # returns; the random NVRAM does not compress below the per-blob cap, so it was
        # announced by its hash for the store to fetch.
        tpm_change, nvram_change = by_kind[StateKind.TPM], by_kind[StateKind.NVRAM]
        assert tpm_change.sealed is not None
        assert (
            open_state_blob(VM_ID, tpm_change.sealed, agent_process.store_keys)
            == (blobs[StateKind.TPM])
        )
        assert sealed_size(blobs[StateKind.NVRAM]) > InlineBudget().per_blob_bytes
        assert nvram_change.sealed is None

        # A heartbeat after the announcement carries the VM with the hashes of what it holds.
        # (One sent between the start and the state turning stable lists it without them.)
        announced_at = changed[-1].position

        def lists_the_vm(beat: HostHeartbeat) -> bool:
            return any(vm.vm_id == VM_ID for vm in beat.vms)

        beats = await tap.wait_for_count(HostHeartbeat, 1, lists_the_vm, CALL_TIMEOUT_S)
        while beats[-1].position < announced_at:
            beats = await tap.wait_for_count(
                HostHeartbeat, len(beats) + 1, lists_the_vm, CALL_TIMEOUT_S
            )
        # The libtpms it reports is the one Debian installed (the agent asks the library).
        assert beats[-1].data.capabilities.libtpms_version == _packaged_libtpms_version()
        (entry,) = beats[-1].data.vms
        assert (entry.epoch, entry.tpm_hash, entry.nvram_hash) == (
            2,
            tpm.content_hash,
            content_hash(nvram),
        )

        assert (await call(PowerOffVm(vm_id=VM_ID), PowerOffVmReply)).ok
        (stopped,) = await tap.wait_for_count(VmStopped, 1, timeout_s=CALL_TIMEOUT_S)
        assert stopped.data.reason is StopReason.DESTROYED
        assert (await call(UndefineVm(vm_id=VM_ID, wipe_state=True), UndefineVmReply)).ok
        await tap.wait_for(VmUndefined, timeout_s=CALL_TIMEOUT_S)
        assert not (agent_process.swtpm_root / VM_ID).exists()
        assert not (agent_process.nvram_dir / f"{VM_NAME}_VARS.fd").exists()
    finally:
        await tap.close()

    await asyncio.to_thread(assert_clean_exit, agent_process)
    # Invariant 4 on the way: the state bytes never reached the agent's output in any form.
    output = agent_process.output()
    for secret in (permall, nvram):
        assert secret[:32].hex() not in output
        assert base64.b64encode(secret[:48]).decode() not in output
    assert "state changes announced" in output


def _packaged_libtpms_version() -> str:
    """libtpms' upstream version as dpkg records it (``0.9.2-3.1+deb12u1`` -> ``0.9.2``)."""
    packaged = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "libtpms0"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return packaged.split(":")[-1].split("-")[0]
