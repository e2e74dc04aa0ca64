"""The host agent against libvirt's real ``test:///`` driver (no daemon, no QEMU).

Each test gets its own simulated host: ``test://<tmp>/node.xml`` starts empty, and its
swtpm root and NVRAM directory live under ``tmp_path``. What is checked:

- lifecycle events travel from libvirt's event thread into the asyncio loop, in order and
  with the stop reason, and the event thread ends when the hypervisor is closed;
- a connection libvirt reports closed (as when libvirtd restarts) is reopened, the owner is
  told so it can rebuild its view, and events flow on the new connection (the real daemon
  restart is in ``test_real_host.py``);
- the command handlers (prepare, start, power-off, undefine, fetch) do what they say with a
  real libvirt underneath, and refuse what invariant 5 says they must (a blob whose hash
  does not match, a running VM, XML for another placement) without touching the state;
- the agent's wiring: a lifecycle event makes the agent track the VM and announce the state
  the prepare step wrote, under the placement epoch from the domain XML.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import libvirt
import pytest
import pytest_asyncio
from pydantic import SecretBytes

from keeper_devtools.swtpm_lab import (
    manufacture_tpm_state,
    permall_framing,
    write_private_ca_config,
)
from keeper_host_agent.agent import HostAgent
from keeper_host_agent.commands.vm_lifecycle import HostCommands
from keeper_host_agent.detect.state_tracker import StateTracker
from keeper_host_agent.hypervisor.domain_xml import fill_nvram_path, parse_domain
from keeper_host_agent.hypervisor.libvirt_adapter import LibvirtHypervisor
from keeper_host_agent.hypervisor.port import LifecycleEvent
from keeper_host_agent.sealing_keys import HostSealingKeys
from keeper_host_agent.settings import HostAgentSettings
from keeper_policy.placement.domain_definition import domain_xml
from keeper_shared.bus.client import BusClient, Delivery
from keeper_shared.messages.envelope import Envelope, P, new_envelope
from keeper_shared.messages.replies import PrepareVmReply, StartVmReply
from keeper_shared.messages.state import FetchState, StateChange, StateChanged
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import FencingToken, StateBlob, StateKind, TpmSecret
from keeper_shared.messages.vm import (
    PowerOffVm,
    PrepareVm,
    StartVm,
    StopReason,
    UndefineVm,
    VmDefined,
    VmStarted,
    VmStopped,
    VmUndefined,
)
from keeper_shared.sealing.state_blobs import seal_state_blob, seal_tpm_secret
from keeper_shared.state_format.blobs import content_hash, seal_blob
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from support.leak_scan import find_leaks, leak_forms
from support.recording_publisher import RecordingPublisher
from support.sealing_keys import new_keys
from support.waiting import wait_until

pytestmark = pytest.mark.libvirt

HOST_ID = "host-t"
VM_ID = "3f9a1c2e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"
VM_NAME = "agent-vm"
TPM_XML = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
NVRAM_SIZE = 540_672
TIMEOUT_S = 15.0
"""Generous bound that only catches hangs."""
DELIVERY = Delivery(user_id=None, redelivered=False, reply_to=None, correlation_id=None)


def vm_domain_xml(*, epoch: int, vm_id: str = VM_ID, name: str = VM_NAME) -> str:
    """The XML policy builds: UEFI q35, the approved TPM, the epoch, `<nvram>` without path."""
    return domain_xml(
        VmSpec(vm_id=vm_id, name=name, guest_os="windows-11"),
        tpm_xml=TPM_XML,
        epoch=epoch,
        ovmf_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        ovmf_vars_template=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    )


def envelope(payload: P) -> Envelope[P]:
    subject = getattr(payload, "vm_id", HOST_ID)
    return new_envelope(payload, source="test", subject=str(subject))


def random_permall(size: int) -> bytes:
    """Random TPM content framed as swtpm stores a permall (the host writes no other)."""
    return permall_framing(os.urandom(size))


def tpm_blob(permall: bytes, *, generation: int = 1) -> StateBlob:
    return seal_blob(
        StateKind.TPM,
        pack_tpm_state({MAIN_STATE_FILE_NAME: permall}),
        FencingToken(epoch=1, generation=generation),
    )


def nvram_blob(content: bytes) -> StateBlob:
    return seal_blob(StateKind.NVRAM, content, FencingToken(epoch=1, generation=1))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def libvirt_event_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "libvirt-events" and t.is_alive()]


def empty_test_node(tmp_path: Path) -> str:
    """A `test:///` URI of a simulated host of this test's own, with no domains."""
    node = tmp_path / "node.xml"
    node.write_text("<node>\n</node>\n")
    return f"test://{node}"


@pytest.fixture(autouse=True)
def _no_event_thread_left() -> Iterator[None]:
    """Closing the hypervisor must end its event thread: none may outlive the test."""
    before = set(libvirt_event_threads())
    yield
    left = [t for t in libvirt_event_threads() if t not in before]
    assert left == [], "a libvirt event thread outlived its hypervisor"


async def settle_tasks() -> None:
    """Let the tasks the code under test spawned finish (bounded), then cancel the rest."""
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current]
    if pending:
        _done, still = await asyncio.wait(pending, timeout=5)
        for task in still:
            task.cancel()
        await asyncio.gather(*still, return_exceptions=True)


async def test_lifecycle_events_reach_asyncio_in_order(tmp_path: Path) -> None:
    nvram_dir = tmp_path / "nvram"
    nvram_dir.mkdir()
    xml = fill_nvram_path(vm_domain_xml(epoch=1), nvram_dir)
    assert f"{nvram_dir}/{VM_NAME}_VARS.fd" in xml
    events: list[LifecycleEvent] = []
    delivered_on: set[int] = set()

    def on_event(event: LifecycleEvent) -> None:
        delivered_on.add(threading.get_ident())
        events.append(event)

    def seen() -> list[tuple[str, StopReason | None]]:
        return [(e.event, e.stop_reason) for e in events]

    hypervisor = LibvirtHypervisor(empty_test_node(tmp_path))
    hypervisor.open(on_event)
    try:
        assert len(libvirt_event_threads()) == 1
        assert await hypervisor.domain(VM_ID) is None
        await hypervisor.define_and_start(xml)
        await wait_until(lambda: len(events) >= 2, "defined + started")
        snapshot = await hypervisor.domain(VM_ID)
        assert snapshot is not None
        assert snapshot.active
        assert snapshot.name == VM_NAME
        assert "tpm-crb" in snapshot.xml
        assert [d.vm_id for d in await hypervisor.list_domains()] == [VM_ID]

        await hypervisor.shutdown(VM_ID, timeout_s=10)
        await wait_until(lambda: len(events) >= 3, "stopped (shutdown)")
        snapshot = await hypervisor.domain(VM_ID)
        assert snapshot is not None
        assert not snapshot.active

        await hypervisor.define_and_start(xml)  # redefine (updated) and start again
        await wait_until(lambda: len(events) >= 5, "defined + started again")
        await hypervisor.power_off(VM_ID)
        await wait_until(lambda: len(events) >= 6, "stopped (destroyed)")
        # test:/// refuses the TPM/NVRAM undefine flags; the plain undefine must follow.
        await hypervisor.undefine(VM_ID, keep_state=False)
        await wait_until(lambda: len(events) >= 7, "undefined")
        assert await hypervisor.domain(VM_ID) is None
        await asyncio.sleep(0.3)
    finally:
        hypervisor.close()

    assert seen() == [
        ("defined", None),
        ("started", None),
        ("stopped", StopReason.SHUTDOWN),
        ("defined", None),
        ("started", None),
        ("stopped", StopReason.DESTROYED),
        ("undefined", None),
    ]
    assert {(e.vm_id, e.name) for e in events} == {(VM_ID, VM_NAME)}
    assert delivered_on == {threading.get_ident()}, "callbacks must run on the asyncio loop"
    assert libvirt_event_threads() == [], "close() must end the event thread"


async def test_a_connection_libvirt_closed_is_reopened_and_events_flow_again(
    tmp_path: Path,
) -> None:
    events: list[LifecycleEvent] = []
    rebuilt = asyncio.Event()

    async def on_reconnect() -> None:
        rebuilt.set()

    def libvirt_reports_closed(generation: int) -> None:
        # libvirt calls the close callback on its event thread, e.g. when libvirtd exits.
        thread = threading.Thread(
            target=hypervisor._closed_by_libvirt,
            args=(None, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, generation),
        )
        thread.start()
        thread.join()

    hypervisor = LibvirtHypervisor(empty_test_node(tmp_path), reconnect_initial_s=0.05)
    hypervisor.open(events.append, on_reconnect=on_reconnect)
    try:
        first_generation = hypervisor._generation
        libvirt_reports_closed(first_generation)
        await asyncio.wait_for(rebuilt.wait(), TIMEOUT_S)
        assert hypervisor.connected
        assert hypervisor.reconnects == 1
        # A late callback of the connection already replaced changes nothing.
        libvirt_reports_closed(first_generation)
        await asyncio.sleep(0.2)
        assert hypervisor.connected
        assert hypervisor.reconnects == 1

        await hypervisor.define_and_start(vm_domain_xml(epoch=1))
        await wait_until(lambda: len(events) >= 2, "defined + started on the new connection")
        await asyncio.sleep(0.3)
    finally:
        hypervisor.close()
    assert [e.event for e in events] == ["defined", "started"]
    assert libvirt_event_threads() == []


async def test_undefine_keeping_state_falls_back_on_the_test_driver(tmp_path: Path) -> None:
    events: list[LifecycleEvent] = []
    hypervisor = LibvirtHypervisor(empty_test_node(tmp_path))
    hypervisor.open(events.append)
    try:
        await hypervisor.define_and_start(vm_domain_xml(epoch=1))
        await hypervisor.power_off(VM_ID)
        await hypervisor.undefine(VM_ID, keep_state=True)
        assert await hypervisor.domain(VM_ID) is None
        await wait_until(lambda: len(events) >= 4, "four events")
    finally:
        hypervisor.close()
    assert [e.event for e in events] == ["defined", "started", "stopped", "undefined"]


@dataclass
class Host:
    """One simulated host: settings, libvirt, a tracker and the command handlers."""

    settings: HostAgentSettings
    hypervisor: LibvirtHypervisor
    tracker: StateTracker
    commands: HostCommands
    published: list[StateChange]
    events: list[LifecycleEvent]
    sealing: HostSealingKeys

    @property
    def tpm_dir(self) -> Path:
        return self.settings.swtpm_root / VM_ID / "tpm2"

    @property
    def nvram_path(self) -> Path:
        return self.settings.nvram_dir / f"{VM_NAME}_VARS.fd"

    async def prepare(
        self,
        *,
        tpm: StateBlob | None = None,
        nvram: StateBlob | None = None,
        tpm_secret: TpmSecret | None = None,
    ) -> PrepareVmReply:
        request = sealed_prepare(self.sealing, 1, tpm=tpm, nvram=nvram, tpm_secret=tpm_secret)
        return await self.commands.prepare(envelope(request), DELIVERY)

    async def start(self, *, xml_epoch: int, epoch: int) -> StartVmReply:
        request = StartVm(vm_id=VM_ID, epoch=epoch, domain_xml=vm_domain_xml(epoch=xml_epoch))
        return await self.commands.start(envelope(request), DELIVERY)


def sealed_prepare(
    sealing: HostSealingKeys,
    epoch: int,
    *,
    tpm: StateBlob | None = None,
    nvram: StateBlob | None = None,
    tpm_secret: TpmSecret | None = None,
) -> PrepareVm:
    """A prepare of the test VM sealed to the host, as the store sends it."""
    key = sealing.own.public
    return PrepareVm(
        vm_id=VM_ID,
        name=VM_NAME,
        epoch=epoch,
        tpm=seal_state_blob(VM_ID, tpm, key, command_epoch=epoch) if tpm else None,
        nvram=seal_state_blob(VM_ID, nvram, key, command_epoch=epoch) if nvram else None,
        tpm_secret=(
            seal_tpm_secret(VM_ID, tpm_secret, key, command_epoch=epoch) if tpm_secret else None
        ),
    )


def host_settings(tmp_path: Path) -> HostAgentSettings:
    swtpm_root = tmp_path / "swtpm"
    nvram_dir = tmp_path / "nvram"
    swtpm_root.mkdir()
    nvram_dir.mkdir()
    return HostAgentSettings(
        host_id=HOST_ID,
        swtpm_root=swtpm_root,
        nvram_dir=nvram_dir,
        libvirt_uri=empty_test_node(tmp_path),
        stability_window_s=0.2,
        sealing_key_file=tmp_path / "host-sealing.key",
        store_sealing_key=new_keys().public.to_text(),
    )


@pytest_asyncio.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    settings = host_settings(tmp_path)
    published: list[StateChange] = []
    events: list[LifecycleEvent] = []

    async def publish(change: StateChange, _inline: StateBlob | None) -> None:
        published.append(change)

    hypervisor = LibvirtHypervisor(settings.libvirt_uri)
    tracker = StateTracker(window_s=settings.stability_window_s, announce=publish)
    hypervisor.open(events.append)
    sealing = HostSealingKeys.from_settings(settings)
    try:
        yield Host(
            settings,
            hypervisor,
            tracker,
            HostCommands(settings, hypervisor, tracker, sealing),
            published,
            events,
            sealing,
        )
    finally:
        for vm_id in list(tracker.vms):
            tracker.untrack(vm_id)
        hypervisor.close()
        await settle_tasks()


def tree(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below ``path`` with its mode and content, to prove nothing changed."""
    return {
        str(p.relative_to(path)): (mode_of(p), p.read_bytes())
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


async def test_prepare_writes_the_tpm_state_where_swtpm_reads_it(host: Host) -> None:
    permall = random_permall(6_000)
    nvram = os.urandom(NVRAM_SIZE)
    blob = tpm_blob(permall)
    done = await host.prepare(tpm=blob, nvram=nvram_blob(nvram))
    assert done.ok, done.error
    assert (done.tpm_hash, done.nvram_hash) == (blob.content_hash, content_hash(nvram))

    permall_path = host.tpm_dir / MAIN_STATE_FILE_NAME
    assert permall_path.read_bytes() == permall
    assert mode_of(permall_path) == 0o600
    assert mode_of(host.tpm_dir) == 0o700
    assert mode_of(host.tpm_dir.parent) == 0o711
    assert sorted(p.name for p in host.tpm_dir.iterdir()) == [MAIN_STATE_FILE_NAME]
    assert host.nvram_path.read_bytes() == nvram
    assert mode_of(host.nvram_path) == 0o600
    # Nothing else appeared: no temporary files left behind, nothing outside the VM's place.
    assert sorted(p.name for p in host.settings.nvram_dir.iterdir()) == [host.nvram_path.name]
    assert [p.name for p in host.settings.swtpm_root.iterdir()] == [VM_ID]

    # A second prepare (a redelivery, or a newer version) replaces the state atomically.
    newer = random_permall(6_200)
    again = await host.prepare(tpm=tpm_blob(newer, generation=2))
    assert again.ok, again.error
    assert permall_path.read_bytes() == newer
    assert mode_of(permall_path) == 0o600
    assert sorted(p.name for p in host.tpm_dir.iterdir()) == [MAIN_STATE_FILE_NAME]


async def test_prepare_refuses_state_sealed_for_another_host_or_another_start(
    host: Host,
) -> None:
    """A prepare the host's key does not open (sealed to another host) or whose blobs were
    sealed for another start (replayed under a new epoch) writes nothing."""
    good = await host.prepare(tpm=tpm_blob(random_permall(6_000)), nvram=nvram_blob(b"\x01" * 4096))
    assert good.ok, good.error
    before = tree(host.settings.swtpm_root) | tree(host.settings.nvram_dir)
    blob = tpm_blob(random_permall(6_000), generation=2)
    elsewhere = PrepareVm(
        vm_id=VM_ID,
        name=VM_NAME,
        epoch=1,
        tpm=seal_state_blob(VM_ID, blob, new_keys().public, command_epoch=1),
    )
    replayed = sealed_prepare(host.sealing, 1, tpm=blob).model_copy(update={"epoch": 2})

    for request, reason in ((elsewhere, "does not hold"), (replayed, "does not open")):
        refused = await host.commands.prepare(envelope(request), DELIVERY)
        assert not refused.ok
        assert reason in (refused.error or "")
    assert tree(host.settings.swtpm_root) | tree(host.settings.nvram_dir) == before


async def test_prepare_refuses_a_blob_whose_hash_does_not_match(host: Host) -> None:
    good = await host.prepare(tpm=tpm_blob(random_permall(6_000)), nvram=nvram_blob(b"\x01" * 4096))
    assert good.ok, good.error
    before = tree(host.settings.swtpm_root) | tree(host.settings.nvram_dir)

    other = tpm_blob(random_permall(6_000), generation=2)
    forged = other.model_copy(update={"content_hash": "0" * 64})
    refused = await host.prepare(tpm=forged)
    assert not refused.ok
    assert refused.error is not None
    assert "does not match" in refused.error
    assert "hash" in refused.error

    # A good TPM with a bad NVRAM must not leave a half-prepared VM either.
    bad_nvram = nvram_blob(b"\x02" * 4096).model_copy(update={"content_hash": "f" * 64})
    half = await host.prepare(tpm=tpm_blob(random_permall(6_000), generation=3), nvram=bad_nvram)
    assert not half.ok
    assert half.error is not None
    assert "does not match" in half.error

    # A blob that is not an archive of allowed files is refused too (invariant 5).
    not_a_tpm = seal_blob(StateKind.TPM, b"\x00" * 2048, FencingToken(epoch=1, generation=4))
    garbage = await host.prepare(tpm=not_a_tpm)
    assert not garbage.ok
    assert garbage.error

    assert tree(host.settings.swtpm_root) | tree(host.settings.nvram_dir) == before


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_a_permall_swtpm_could_not_load_never_replaces_a_real_tpm(
    host: Host, tmp_path: Path, encrypted: bool
) -> None:
    """A TPM swtpm_setup manufactured (plain, or encrypted as libvirt does with a secret) is
    written; a prepare that would replace it with a permall swtpm refuses (0 bytes, cut
    short, bytes lost in the middle, not libtpms' state) is refused with the reason, and
    neither the TPM nor the NVRAM sent with it is touched."""
    manufactured = tmp_path / "manufactured"
    await manufacture_tpm_state(
        manufactured,
        config=write_private_ca_config(tmp_path / "ca"),
        passphrase=b"libvirt secret value" if encrypted else None,
    )
    real = (manufactured / MAIN_STATE_FILE_NAME).read_bytes()
    assert (await host.prepare(tpm=tpm_blob(real), nvram=nvram_blob(b"\x01" * 4096))).ok
    before = tree(host.settings.swtpm_root) | tree(host.settings.nvram_dir)
    middle = len(real) // 2
    framed = permall_framing(os.urandom(6_000))
    unloadable = {
        "is empty (0 bytes)": b"",
        "its swtpm header says": real[: len(real) - 512],
        "shorter than swtpm's 10-byte state header": real[:6],
        "truncated": real[:middle] + real[middle + 100 :],
        # swtpm's framing right, but what it holds is not libtpms' state.
        "permanent-state magic": framed[:18] + b"\0\0\0\0" + framed[22:],
    }

    for generation, (reason, permall) in enumerate(unloadable.items(), start=2):
        refused = await host.prepare(
            tpm=tpm_blob(permall, generation=generation), nvram=nvram_blob(b"\x02" * 4096)
        )

        assert not refused.ok, reason
        assert refused.error is not None
        assert reason in refused.error
        assert "left as it was" in refused.error
        assert tree(host.settings.swtpm_root) | tree(host.settings.nvram_dir) == before


async def test_an_encrypted_tpm_is_refused_by_a_libvirt_without_secrets(host: Host) -> None:
    """The test driver has no secret driver: a TPM state encrypted with a libvirt secret
    could not be read there, so nothing is written and the refusal says why (never the
    secret's value)."""
    value = os.urandom(32)
    secret = TpmSecret(uuid=str(uuid.uuid4()), value=SecretBytes(value))

    refused = await host.prepare(
        tpm=tpm_blob(random_permall(6_000)), nvram=nvram_blob(b"\x01" * 4096), tpm_secret=secret
    )

    assert not refused.ok
    assert refused.error is not None
    assert "no secret driver" in refused.error
    assert find_leaks([("error", refused.error.encode())], leak_forms(value)) == []
    assert tree(host.settings.swtpm_root) | tree(host.settings.nvram_dir) == {}


async def test_prepare_is_refused_while_the_vm_runs(host: Host) -> None:
    first = random_permall(6_000)
    assert (await host.prepare(tpm=tpm_blob(first))).ok
    started = await host.start(xml_epoch=1, epoch=1)
    assert started.ok, started.error
    snapshot = await host.hypervisor.domain(VM_ID)
    assert snapshot is not None
    assert snapshot.active

    refused = await host.prepare(tpm=tpm_blob(random_permall(6_000), generation=2))
    assert not refused.ok
    assert refused.error is not None
    assert "running" in refused.error
    assert (host.tpm_dir / MAIN_STATE_FILE_NAME).read_bytes() == first

    powered_off = await host.commands.power_off(envelope(PowerOffVm(vm_id=VM_ID)), DELIVERY)
    assert powered_off.ok, powered_off.error
    allowed = await host.prepare(tpm=tpm_blob(random_permall(6_000), generation=3))
    assert allowed.ok, allowed.error


async def test_start_refuses_xml_of_another_placement(host: Host) -> None:
    refused = await host.start(xml_epoch=1, epoch=2)
    assert not refused.ok
    assert refused.error is not None
    assert "epoch" in refused.error
    assert await host.hypervisor.domain(VM_ID) is None, "nothing may be defined"

    other_vm = StartVm(
        vm_id=VM_ID,
        epoch=1,
        domain_xml=vm_domain_xml(epoch=1, vm_id="aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"),
    )
    refused_other = await host.commands.start(envelope(other_vm), DELIVERY)
    assert not refused_other.ok
    assert await host.hypervisor.domain(VM_ID) is None

    broken = StartVm(vm_id=VM_ID, epoch=1, domain_xml="<domain><name>x</name")
    refused_broken = await host.commands.start(envelope(broken), DELIVERY)
    assert not refused_broken.ok
    assert refused_broken.error is not None
    assert "XML" in refused_broken.error

    started = await host.start(xml_epoch=2, epoch=2)
    assert started.ok, started.error
    snapshot = await host.hypervisor.domain(VM_ID)
    assert snapshot is not None
    assert snapshot.active
    # The agent filled in the NVRAM path the prepare step writes to.
    assert f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{host.nvram_path}" in snapshot.xml


async def test_undefine_with_wipe_state_removes_tpm_and_nvram(host: Host) -> None:
    assert (
        await host.prepare(tpm=tpm_blob(random_permall(6_000)), nvram=nvram_blob(os.urandom(4096)))
    ).ok
    assert (await host.start(xml_epoch=1, epoch=1)).ok
    assert (await host.commands.power_off(envelope(PowerOffVm(vm_id=VM_ID)), DELIVERY)).ok
    assert host.tpm_dir.exists()
    assert host.nvram_path.exists()

    done = await host.commands.undefine(
        envelope(UndefineVm(vm_id=VM_ID, wipe_state=True)), DELIVERY
    )
    assert done.ok, done.error
    assert done.was_defined
    assert await host.hypervisor.domain(VM_ID) is None
    assert not (host.settings.swtpm_root / VM_ID).exists()
    assert not host.nvram_path.exists()
    assert host.settings.swtpm_root.is_dir(), "the swtpm root itself stays"
    assert VM_ID not in host.tracker.vms

    # Idempotent: a redelivered undefine finds nothing and says so.
    again = await host.commands.undefine(
        envelope(UndefineVm(vm_id=VM_ID, wipe_state=True)), DELIVERY
    )
    assert again.ok
    assert not again.was_defined


async def test_undefine_without_wipe_keeps_the_local_state(host: Host) -> None:
    permall = random_permall(6_000)
    assert (await host.prepare(tpm=tpm_blob(permall), nvram=nvram_blob(b"\x05" * 4096))).ok
    assert (await host.start(xml_epoch=1, epoch=1)).ok
    assert (await host.commands.power_off(envelope(PowerOffVm(vm_id=VM_ID)), DELIVERY)).ok
    done = await host.commands.undefine(
        envelope(UndefineVm(vm_id=VM_ID, wipe_state=False)), DELIVERY
    )
    assert done.ok, done.error
    assert await host.hypervisor.domain(VM_ID) is None
    assert (host.tpm_dir / MAIN_STATE_FILE_NAME).read_bytes() == permall
    assert host.nvram_path.read_bytes() == b"\x05" * 4096


async def test_fetch_serves_the_prepared_state_of_a_tracked_vm(host: Host) -> None:
    permall = random_permall(6_000)
    nvram = os.urandom(NVRAM_SIZE)
    tpm = tpm_blob(permall)
    assert (await host.prepare(tpm=tpm, nvram=nvram_blob(nvram))).ok
    assert (await host.start(xml_epoch=1, epoch=1)).ok
    snapshot = await host.hypervisor.domain(VM_ID)
    assert snapshot is not None
    location = parse_domain(
        snapshot.xml, swtpm_root=host.settings.swtpm_root, nvram_dir=host.settings.nvram_dir
    )
    assert location is not None
    host.tracker.track(location)

    unknown = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
    reply = await asyncio.wait_for(
        host.commands.fetch(envelope(FetchState(vm_ids=[VM_ID, unknown])), DELIVERY), TIMEOUT_S
    )
    assert reply.missing == [unknown]
    (fetched,) = reply.vms
    assert fetched.vm_id == VM_ID
    by_kind = {blob.kind: blob for blob in fetched.blobs}
    assert by_kind[StateKind.TPM].content_hash == tpm.content_hash
    assert by_kind[StateKind.NVRAM].content_hash == content_hash(nvram)
    assert all(blob.token.epoch == 1 for blob in fetched.blobs)


def announced_changes(bus: RecordingPublisher) -> list[StateChange]:
    """Every change in every ``state.changed`` the agent published, in order."""
    return [c for e in bus.of_type(StateChanged) for c in e.changes]


@pytest_asyncio.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[HostAgent, RecordingPublisher]]:
    bus = RecordingPublisher()
    host_agent = HostAgent(host_settings(tmp_path), cast(BusClient, bus))
    host_agent.hypervisor.open(host_agent.on_lifecycle)
    watcher = asyncio.create_task(host_agent.watcher.watch_inotify())
    try:
        yield host_agent, bus
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        for vm_id in list(host_agent.tracker.vms):
            host_agent.tracker.untrack(vm_id)
        host_agent.watcher.close()
        host_agent.hypervisor.close()
        await settle_tasks()


async def test_agent_tracks_a_started_vm_and_announces_the_prepared_state(
    agent: tuple[HostAgent, RecordingPublisher],
) -> None:
    """prepare -> start -> lifecycle event -> tracked -> state.changed with the prepared
    hashes under the XML's epoch; power-off and undefine are reported and untrack it."""
    host_agent, bus = agent
    permall = random_permall(6_000)
    nvram = os.urandom(NVRAM_SIZE)
    tpm = tpm_blob(permall)
    prepared = await host_agent.commands.prepare(
        envelope(sealed_prepare(host_agent.sealing, 3, tpm=tpm, nvram=nvram_blob(nvram))),
        DELIVERY,
    )
    assert prepared.ok, prepared.error
    started = await host_agent.commands.start(
        envelope(StartVm(vm_id=VM_ID, epoch=3, domain_xml=vm_domain_xml(epoch=3))), DELIVERY
    )
    assert started.ok, started.error

    await wait_until(lambda: len(announced_changes(bus)) >= 2, "two changes announced")
    by_kind = {c.kind: c for c in announced_changes(bus)}
    assert by_kind[StateKind.TPM].content_hash == tpm.content_hash
    assert by_kind[StateKind.NVRAM].content_hash == content_hash(nvram)
    assert all(c.token.epoch == 3 for c in by_kind.values())
    assert all(e.host == HOST_ID for e in bus.of_type(StateChanged))
    assert len(bus.of_type(VmDefined)) == 1
    assert len(bus.of_type(VmStarted)) == 1
    (entry,) = host_agent.tracker.inventory()
    assert (entry.vm_id, entry.epoch) == (VM_ID, 3)
    assert entry.tpm_hash == tpm.content_hash

    # swtpm saves while the VM runs: the watcher (set up by the lifecycle handling) sees it.
    tpm_dir = host_agent.settings.swtpm_root / VM_ID / "tpm2"
    newer = random_permall(6_000)
    (tpm_dir / "TMP2-00.permall").write_bytes(newer)
    os.rename(tpm_dir / "TMP2-00.permall", tpm_dir / MAIN_STATE_FILE_NAME)
    newer_hash = content_hash(pack_tpm_state({MAIN_STATE_FILE_NAME: newer}))
    await wait_until(
        lambda: any(c.content_hash == newer_hash for c in announced_changes(bus)),
        "state.changed for swtpm's save",
    )

    assert (await host_agent.commands.power_off(envelope(PowerOffVm(vm_id=VM_ID)), DELIVERY)).ok
    await wait_until(lambda: len(bus.of_type(VmStopped)) == 1, "vm.stopped")
    (stopped,) = bus.of_type(VmStopped)
    assert stopped.reason is StopReason.DESTROYED
    assert (
        await host_agent.commands.undefine(
            envelope(UndefineVm(vm_id=VM_ID, wipe_state=True)), DELIVERY
        )
    ).ok
    await wait_until(lambda: len(bus.of_type(VmUndefined)) == 1, "vm.undefined")
    await wait_until(lambda: VM_ID not in host_agent.tracker.vms, "the VM untracked")
    assert not tpm_dir.parent.exists()
    assert host_agent.tracker.inventory() == []
    # Every event is about its VM, or (changes found together, a heartbeat) about the host.
    assert all(
        subject in (getattr(payload, "vm_id", None), HOST_ID) for payload, subject in bus.events
    )
