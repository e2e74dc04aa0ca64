"""Starts and stops by any VM manager, on a real host: libvirt's QEMU hook
(``python -m keeper_host_agent install-hook``, through ``deploy/local/real-host
install-hook``) with the state store, policy and one host agent as processes.

Every domain here is defined from a plain XML file with ``virsh`` (as virt-install writes
one: q35, UEFI with its own NVRAM, a TPM 2.0 CRB emulator, a small disk image) and started
and stopped with ``virsh``: the keeper never defines one. The VM is registered with policy
(``tpm.enable``) and nothing else; the hook's ``prepare begin`` places it on this host.

- host loss: the agent and QEMU are SIGKILLed, the swtpm directory and NVRAM wiped; the same
  XML defined again and started with ``virsh start`` gets its stored state back before
  QEMU starts, and its TPM has the first run's endorsement key;
- with the store stopped, ``virsh start`` of a VM whose state is stored is refused with the
  keeper's message and no TPM is manufactured; fail-open mode starts it and logs it;
- never a silent blank TPM: a VM whose state is stored starts with a new TPM (fail-open,
  store down, its swtpm directory gone); once the store is back it flags the VM at once
  (``state.tpm.reset``, ``keeper vm status`` says ``tpm-reset``), and the next start gets
  the old TPM back (the first run's endorsement key), which ends the reset;
- ``virsh undefine --tpm --nvram`` after a stop, and a transient domain (``virsh create``)
  destroyed right after a TPM change, lose nothing: what libvirt had at ``release end``
  (copied by a probe hook that runs after the keeper's) is the newest stored version.

The module installs a second, test-only hook (``zz-keeper-test-probe``) that records each
phase and copies the state at ``release end``; both hooks are removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.agent.test_real_host import (
    NAME_PREFIX,
    STEP_TIMEOUT_S,
    RealHost,
    RestoreCapture,
    SerialConsole,
    Stack,
    _unavailable,
    disk_nvram_content,
    disk_tpm_content,
    newest_persisted,
    nvram_path,
    read_ek_public,
    real_host,
    real_host_script,
    stack,
    tpm_dir,
    wait_event,
    wait_persisted_current,
)
from keeper_shared.keeper_client import views
from keeper_shared.keeper_client.client import KeeperClient
from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.tpm_reset import ResetFoundBy, TpmReset, TpmResetCleared
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm import VmStarted
from keeper_shared.state_format.blobs import content_hash
from keeper_shared.state_format.tpm_archive import (
    MAIN_STATE_FILE_NAME,
    pack_tpm_state,
    read_tpm_state_dir,
)

__all__ = ["real_host", "stack"]  # the fixtures, used by name

pytestmark = [
    pytest.mark.real_host,
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.swtpm,
    pytest.mark.timeout(1200),
]

HOOKS_DIR = Path("/etc/libvirt/hooks/qemu.d")
PROBE_HOOK = HOOKS_DIR / "zz-keeper-test-probe"
PROBE_DIR = Path("/run/keeper-test-probe")
BOOT_DONE = (b"Shell>", b"No bootable option or device was found", b"BdsDxe")

PROBE_SOURCE = f"""#!/usr/bin/python3
# Test probe (installed by {Path(__file__).name}): records each hook phase and whether the
# TPM state is there, and at `release end` copies the TPM state and NVRAM.
import os, re, shutil, sys, time
xml = sys.stdin.read()
match = re.search(r"<uuid>([0-9a-f-]+)</uuid>", xml)
vm_id = match.group(1) if match else "unknown"
tpm2 = "/var/lib/libvirt/swtpm/" + vm_id + "/tpm2"
nvram = re.search(r"<nvram[^>]*>([^<]+)</nvram>", xml)
out = "{PROBE_DIR}/" + vm_id
os.makedirs(out, exist_ok=True)
phase = " ".join(sys.argv[2:4])
with open(out + "/phases", "a") as log:
    log.write(phase + " " + str(os.path.exists(tpm2 + "/tpm2-00.permall")) + "\\n")
if phase == "release end":
    if os.path.isdir(tpm2):
        shutil.copytree(tpm2, out + "/tpm2", dirs_exist_ok=True)
    if nvram and os.path.isfile(nvram.group(1)):
        shutil.copyfile(nvram.group(1), out + "/nvram")
"""


def domain_xml(vm_id: str, name: str, disk: Path) -> str:
    """A domain as virt-install writes one for a UEFI guest with a TPM (no keeper metadata)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{vm_id}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{nvram_path(name)}</nvram>
  </os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'/>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>
"""


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["virsh", "-c", "qemu:///system", *args],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"virsh {' '.join(args)} failed: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Guest:
    """One domain of these tests and its XML file."""

    vm_id: str
    name: str
    xml_file: Path

    def is_ours(self, event: Payload) -> bool:
        return getattr(event, "vm_id", None) == self.vm_id

    def probe_phases(self) -> list[str]:
        path = PROBE_DIR / self.vm_id / "phases"
        return path.read_text().splitlines() if path.exists() else []

    def probe_tpm(self) -> bytes:
        return pack_tpm_state(read_tpm_state_dir(PROBE_DIR / self.vm_id / "tpm2"))

    def probe_nvram(self) -> bytes:
        return (PROBE_DIR / self.vm_id / "nvram").read_bytes()


@pytest.fixture(scope="module")
def hooked_host(real_host: RealHost) -> Iterator[RealHost]:
    """The real host with the keeper's hook (and the test probe) installed."""
    status = real_host_script("status")
    if "started by real-host" not in status.stdout:
        _unavailable("libvirtd was not started by deploy/local/real-host; cannot add a hook")
    HOOKS_DIR.mkdir(parents=True, exist_ok=True)
    PROBE_HOOK.write_text(PROBE_SOURCE)
    PROBE_HOOK.chmod(0o755)
    env = {
        **os.environ,
        "KEEPER_PYTHON": sys.executable,
        "KEEPER_HOST_HOOK_SOCKET": "/run/keeper/host-agent.sock",
        "KEEPER_HOST_HOOK_PREPARE_TIMEOUT_S": "8",
    }
    installed = subprocess.run(
        [str(Path(__file__).resolve().parents[3] / "deploy/local/real-host"), "install-hook"],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        env=env,
        check=False,
    )
    print(installed.stdout + installed.stderr)
    try:
        assert installed.returncode == 0, installed.stderr
        assert (HOOKS_DIR / "vtpm-keeper").stat().st_mode & 0o777 == 0o755
        yield real_host
    finally:
        PROBE_HOOK.unlink(missing_ok=True)
        real_host_script("remove-hook")
        shutil.rmtree(PROBE_DIR, ignore_errors=True)


@pytest.fixture
async def guest(hooked_host: RealHost, stack: Stack, tmp_path: Path) -> Guest:
    """A registered VM (``tpm.enable``) and its domain XML file; nothing defined yet."""
    return await registered_guest(stack, tmp_path)


async def registered_guest(stack: Stack, directory: Path) -> Guest:
    """A new VM registered with policy, its blank disk image and its domain XML file."""
    vm_id = str(uuid.uuid4())
    name = f"{NAME_PREFIX}{vm_id[:8]}"
    disk = directory / f"{name}.img"
    with disk.open("wb") as image:
        image.truncate(16 * 1024 * 1024)  # sparse, blank: the firmware finds nothing to boot
    xml_file = directory / f"{name}.xml"
    xml_file.write_text(domain_xml(vm_id, name, disk))
    spec = VmSpec(vm_id=vm_id, name=name, guest_os="windows-11")
    await stack.client.enable_tpm(spec, cluster=stack.host_id)
    return Guest(vm_id, name, xml_file)


async def stored_heads(client: KeeperClient, vm_id: str) -> dict[StateKind, tuple[int, str]]:
    """The newest stored version and its hash, per kind."""
    history = await client.state_history(vm_id)
    heads = {}
    for kind in history.kinds:
        for version in kind.versions:
            if version.version == kind.head_version:
                heads[kind.kind] = (version.version, version.content_hash)
    return heads


async def start_and_store(stack: Stack, guest: Guest) -> None:
    """``virsh define`` + ``virsh start``; wait until the store holds what the host holds."""
    watch = await stack.client.watch_events("vm.*.*", "state.persisted.*")
    virsh("define", str(guest.xml_file))
    virsh("start", guest.name)
    await wait_event(watch, VmStarted, guest.is_ours, "vm.started of the hooked start")
    for kind, current in (
        (StateKind.TPM, lambda: disk_tpm_content(guest.vm_id)),
        (StateKind.NVRAM, lambda: disk_nvram_content(guest.name)),
    ):
        await wait_persisted_current(watch, guest.vm_id, kind, current, timeout_s=STEP_TIMEOUT_S)


def wipe_host_state(guest: Guest) -> None:
    """A new machine: no domain, no swtpm directory, no NVRAM."""
    with contextlib.suppress(Exception):
        virsh("undefine", "--tpm", "--nvram", guest.name, check=False)
    shutil.rmtree(tpm_dir(guest.vm_id).parent, ignore_errors=True)
    nvram_path(guest.name).unlink(missing_ok=True)


async def restart_agent(stack: Stack, **env: str) -> None:
    """Start the host agent (again), with ``env`` added; wait until it serves the hook."""
    await stack.agent.stop()
    stack.agent.env.update(env)
    mark = len(stack.agent_log())
    await stack.agent.start()
    await stack.wait_logged("hook socket listening", mark)


async def test_host_loss_the_hook_puts_the_stored_tpm_back_before_qemu_starts(
    stack: Stack, guest: Guest, tmp_path: Path
) -> None:
    client = stack.client
    run1 = await client.watch_events("vm.*.*", "state.persisted.*")
    virsh("define", str(guest.xml_file))
    virsh("start", guest.name)
    await wait_event(run1, VmStarted, guest.is_ours, "vm.started of the first run")
    placed = await stack.wait_logged("placement epoch stamped after start", 0)
    assert stack.agent_log()[placed].get("vm_id") == guest.vm_id
    console = SerialConsole(virsh("dumpxml", guest.name).stdout)
    try:
        await console.wait_for_any(BOOT_DONE, 180.0)
    finally:
        console.close()
    await wait_persisted_current(
        run1, guest.vm_id, StateKind.TPM, lambda: disk_tpm_content(guest.vm_id)
    )
    await wait_persisted_current(
        run1, guest.vm_id, StateKind.NVRAM, lambda: disk_nvram_content(guest.name)
    )
    saved_run1 = tmp_path / "run1-tpm2"
    shutil.copytree(tpm_dir(guest.vm_id), saved_run1, ignore=shutil.ignore_patterns(".*"))
    newest_tpm = newest_persisted(run1, guest.vm_id, StateKind.TPM)
    newest_nvram = newest_persisted(run1, guest.vm_id, StateKind.NVRAM)

    # --- the host dies: agent and QEMU SIGKILLed, its disk state gone (a new machine)
    assert stack.agent.process is not None
    stack.agent.process.kill()
    await stack.agent.process.wait()
    qemu_pid = int(Path(f"/run/libvirt/qemu/{guest.name}.pid").read_text().strip())
    os.kill(qemu_pid, signal.SIGKILL)
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while virsh("domstate", guest.name, check=False).stdout.strip() == "running":
        assert time.monotonic() < deadline, "libvirt did not notice QEMU die"
        await asyncio.sleep(0.2)
    wipe_host_state(guest)
    assert not tpm_dir(guest.vm_id).exists()
    assert not nvram_path(guest.name).exists()
    mark = len(stack.agent_log())
    await stack.agent.start()
    await stack.wait_logged("hook socket listening", mark)

    # --- the same XML, defined and started with virsh: the hook restores before QEMU
    run2 = await client.watch_events("vm.*.*", "state.persisted.*")
    virsh("define", str(guest.xml_file))
    capture = RestoreCapture(guest.vm_id, guest.name)
    capture.start()
    try:
        virsh("start", guest.name)
    finally:
        capture.stop()
    await wait_event(run2, VmStarted, guest.is_ours, "vm.started after the restore")
    assert capture.tpm is not None, "the hook wrote no TPM state"
    assert capture.nvram is not None, "the hook wrote no NVRAM"
    assert content_hash(capture.tpm) == newest_tpm.content_hash
    assert content_hash(capture.nvram) == newest_nvram.content_hash
    prepared = stack.agent_log()[await stack.wait_logged("start prepared", mark)]
    assert prepared.get("claim") == "kept", prepared
    print(f"\nhook prepare (claim, read, verify, write) took {prepared.get('took_s')} s")

    # The same TPM: the endorsement key of the state the hook put back is the first run's.
    restored = tmp_path / "restored-tpm2"
    restored.mkdir()
    for file_name, data in capture.tpm_files.items():
        (restored / file_name).write_bytes(data)
    assert MAIN_STATE_FILE_NAME in capture.tpm_files
    ek_run1 = await read_ek_public(saved_run1, tmp_path / "ek1")
    ek_run2 = await read_ek_public(restored, tmp_path / "ek2")
    assert ek_run1 == ek_run2, "the restored TPM has another endorsement key"
    virsh("destroy", guest.name)
    wipe_host_state(guest)


async def test_a_start_whose_stored_state_cannot_be_had_is_refused_unless_fail_open(
    stack: Stack, guest: Guest
) -> None:
    await start_and_store(stack, guest)
    virsh("destroy", guest.name)
    wipe_host_state(guest)
    store = next(service for service in stack.services if service.name == "state-store")
    await store.stop()

    # --- fail closed (the default): refused with the keeper's reason, no TPM made
    virsh("define", str(guest.xml_file))
    refused = virsh("start", guest.name, check=False)
    assert refused.returncode != 0
    assert f"vTPM Keeper refused to start {guest.name}" in refused.stderr, refused.stderr
    assert "state store did not answer" in refused.stderr, refused.stderr
    assert not (tpm_dir(guest.vm_id) / MAIN_STATE_FILE_NAME).exists(), "a TPM was manufactured"
    assert virsh("domstate", guest.name).stdout.strip() == "shut off"
    print(f"\nlibvirt's error: {refused.stderr.strip()}")

    # --- fail open: the same start goes on, and the agent says what it skipped
    await restart_agent(stack, KEEPER_HOST_HOOK_FAIL_OPEN="true")
    mark = len(stack.agent_log())
    virsh("start", guest.name)
    allowed = stack.agent_log()[
        await stack.wait_logged("start allowed by fail-open although", mark)
    ]
    assert "state store did not answer" in str(allowed.get("reason")), allowed
    assert virsh("domstate", guest.name).stdout.strip() == "running"
    virsh("destroy", guest.name)
    wipe_host_state(guest)


async def test_a_blank_tpm_announced_for_a_vm_with_stored_state_is_flagged_and_not_restored(
    stack: Stack, guest: Guest, tmp_path: Path
) -> None:
    client = stack.client
    await start_and_store(stack, guest)
    own_tpm = tmp_path / "own-tpm2"
    shutil.copytree(tpm_dir(guest.vm_id), own_tpm, ignore=shutil.ignore_patterns(".*"))
    ek_own = await read_ek_public(own_tpm, tmp_path / "ek-own")
    virsh("destroy", guest.name)
    wipe_host_state(guest)

    # --- the store is down and the host fails open: libvirt manufactures a new TPM
    store = next(service for service in stack.services if service.name == "state-store")
    await store.stop()
    await restart_agent(stack, KEEPER_HOST_HOOK_FAIL_OPEN="true")
    mark = len(stack.agent_log())
    virsh("define", str(guest.xml_file))
    virsh("start", guest.name)
    await stack.wait_logged("start allowed by fail-open although", mark)
    blank_tpm = tmp_path / "blank-tpm2"
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while disk_tpm_content(guest.vm_id) is None:
        assert time.monotonic() < deadline, "libvirt manufactured no TPM"
        await asyncio.sleep(0.2)
    shutil.copytree(tpm_dir(guest.vm_id), blank_tpm, ignore=shutil.ignore_patterns(".*"))
    ek_blank = await read_ek_public(blank_tpm, tmp_path / "ek-blank")
    assert ek_blank != ek_own, "fail-open started the VM with a new TPM"

    # --- the store comes back and persists what the host announced: flagged at once
    watch = await client.watch_events("state.tpm.reset.*", "state.tpm.reset.cleared.*")
    await store.start()
    reset = (
        await wait_event(watch, TpmReset, guest.is_ours, "state.tpm.reset of the new TPM")
    ).data
    assert reset.found_by is ResetFoundBy.PERSIST
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while (status := await views.vm_status(client, guest.vm_id)) is None or not status.tpm_reset:
        assert time.monotonic() < deadline, "policy never flagged the VM"
        await asyncio.sleep(0.2)
    assert status.protection() == "tpm-reset"
    assert status.as_json(time.time())["tpm_reset"]["version"] == reset.version
    print(f"\nkeeper vm status: {status.protection()}: {status.tpm_reset}")

    # --- the next start (fail closed again) gets the VM's own TPM, not the newest one
    virsh("destroy", guest.name)
    wipe_host_state(guest)
    await restart_agent(stack, KEEPER_HOST_HOOK_FAIL_OPEN="false")
    virsh("define", str(guest.xml_file))
    capture = RestoreCapture(guest.vm_id, guest.name)
    capture.start()
    try:
        virsh("start", guest.name)
    finally:
        capture.stop()
    assert capture.tpm is not None, "the hook wrote no TPM state"
    restored = tmp_path / "restored-tpm2"
    restored.mkdir()
    for file_name, data in capture.tpm_files.items():
        (restored / file_name).write_bytes(data)
    assert await read_ek_public(restored, tmp_path / "ek-restored") == ek_own

    # --- the guest runs on its own TPM again: the reset is over, status says so
    cleared = await wait_event(
        watch, TpmResetCleared, guest.is_ours, "state.tpm.reset.cleared (own TPM back)"
    )
    assert cleared.data.reset_version == reset.version
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while (status := await views.vm_status(client, guest.vm_id)) is None or status.tpm_reset:
        assert time.monotonic() < deadline, "policy kept the VM flagged"
        await asyncio.sleep(0.2)
    assert status.protection() == "protected"
    virsh("destroy", guest.name)
    wipe_host_state(guest)


async def test_undefine_after_a_stop_and_a_destroyed_transient_domain_lose_nothing(
    stack: Stack, guest: Guest, tmp_path: Path
) -> None:
    client = stack.client
    # --- persistent: destroy, then undefine with its TPM and NVRAM at once
    await start_and_store(stack, guest)
    virsh("destroy", guest.name)
    virsh("undefine", "--tpm", "--nvram", guest.name, check=False)  # policy may be first
    heads = await stored_heads(client, guest.vm_id)
    assert heads[StateKind.TPM][1] == content_hash(guest.probe_tpm())
    assert heads[StateKind.NVRAM][1] == content_hash(guest.probe_nvram())
    phases = guest.probe_phases()
    assert phases[-2:] == ["stopped end True", "release end True"], phases

    # --- transient: virsh create, destroyed the moment its TPM changed
    transient = await registered_guest(stack, tmp_path)
    mark = len(stack.agent_log())
    virsh("create", str(transient.xml_file))
    await stack.wait_logged("placement epoch stamped after start", mark)
    first = disk_tpm_content(transient.vm_id)
    deadline = time.monotonic() + 180.0
    while disk_tpm_content(transient.vm_id) in (None, first):
        assert time.monotonic() < deadline, "the firmware never changed the TPM"
        await asyncio.sleep(0.01)
    virsh("destroy", transient.name)
    assert not tpm_dir(transient.vm_id).parent.exists(), "libvirt kept the transient's state"
    final = transient.probe_tpm()
    assert final != first
    heads = await stored_heads(client, transient.vm_id)
    assert heads[StateKind.TPM][1] == content_hash(final), "the last TPM change was lost"
    assert heads[StateKind.NVRAM][1] == content_hash(transient.probe_nvram())
    released = [
        line for line in stack.agent_log()[mark:] if line.get("event") == "final state stored"
    ]
    print(
        f"\ntransient domain: hook phases {transient.probe_phases()}; final state stored in "
        f"{[line.get('took_s') for line in released]} s"
    )
