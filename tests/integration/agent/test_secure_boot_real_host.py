"""A UEFI Secure Boot VM on a real host keeps its enrolled keys through the keeper.

The keeper places and starts a VM approved with Secure Boot: policy's domain has a q35
machine, SMM on, the Secure Boot OVMF build as a secure loader and Debian's NVRAM template
with Microsoft's keys enrolled (``OVMF_VARS_4M.ms.fd``), and a TPM. OVMF boots (no disk:
to the boot manager) and writes its NVRAM; the store persists it. The power-off retrieves
the final state and libvirt's undefine wipes the swtpm directory and the NVRAM file, as on
a new host; the next start restores both from the store and the firmware boots on them.

The NVRAM is read with a real parser (virt-firmware, see tests/support/secure_boot_vars.py)
at four points: the template, the first run's persisted NVRAM, the NVRAM the restore wrote
before QEMU started (the store's newest version, which the power-off retrieved), and the
NVRAM the second boot wrote and the store persisted. PK, KEK,
db and dbx (every certificate and hash, and the variables' bytes), ``SecureBootEnable`` and
``CustomMode`` are the same at all four, and Secure Boot is on: a restore that lost the
keys would leave the guest in setup mode, where Windows 11 and BitLocker see Secure Boot
off. The same TPM (endorsement key) is shown by test_real_host.py and not repeated here.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest

from integration.agent.test_real_host import (
    BOOT_DONE,
    BOOT_TIMEOUT_S,
    NAME_PREFIX,
    SWTPM_ROOT,
    RealHost,
    RestoreCapture,
    SerialConsole,
    Stack,
    _live_xml,
    disk_nvram_content,
    disk_tpm_content,
    newest_persisted,
    nvram_path,
    nvram_template,
    real_host,
    stack,
    wait_event,
    wait_persisted_current,
)
from keeper_shared.messages.envelope import Payload
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm import VmStarted, VmUndefined
from keeper_shared.state_format.blobs import content_hash
from support.secure_boot_vars import SecureBootVariables, read_secure_boot_variables

__all__ = ["real_host", "stack"]  # the fixtures, used by name

pytestmark = [
    pytest.mark.real_host,
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.swtpm,
    pytest.mark.timeout(1200),
]


def parsed(content: bytes, path: Path) -> SecureBootVariables:
    """``content`` kept as the file ``path`` (for the record) and parsed there."""
    path.write_bytes(content)
    return read_secure_boot_variables(path)


def assert_same_secure_boot(found: SecureBootVariables, expected: SecureBootVariables) -> None:
    """Every key and switch as ``expected``, parsed and byte for byte, and Secure Boot on."""
    for name in ("PK", "KEK", "db", "dbx"):
        assert found.keys.get(name) == expected.keys.get(name), f"{name} differs"
    assert found.raw == expected.raw
    assert found.secure_boot_enable is True
    assert found.custom_mode is False
    assert found.secure_boot_enabled


async def test_secure_boot_keys_and_state_survive_power_off_wipe_and_restore(
    real_host: RealHost, stack: Stack, tmp_path: Path
) -> None:
    client, host = stack.client, stack.host_id
    vm_id = str(uuid.uuid4())
    name = f"{NAME_PREFIX}{vm_id[:8]}"
    spec = VmSpec(vm_id=vm_id, name=name, guest_os="windows-11", secure_boot=True, smm=True)
    figures: list[str] = []

    def is_ours(event: Payload) -> bool:
        return getattr(event, "vm_id", None) == vm_id

    # --- first start: policy's Secure Boot domain, OVMF boots and writes its NVRAM
    run1 = await client.watch_events("vm.*.*", "state.persisted.*")
    await client.enable_tpm(spec, cluster=host)
    began = time.monotonic()
    await client.start(vm_id, host)
    await wait_event(run1, VmStarted, is_ours, "vm.started of the Secure Boot VM")
    live_xml = _live_xml(vm_id)
    assert re.search(r"<loader[^>]* secure='yes'", live_xml), "the loader is not secure"
    assert re.search(r"<smm state='on'\s*/>", live_xml), "SMM is not on"
    assert "machine='pc-q35" in live_xml
    assert "<tpm model='tpm-crb'>" in live_xml
    template_path = nvram_template(live_xml)
    template = read_secure_boot_variables(template_path)
    assert template.secure_boot_enabled, f"{template_path} enrolls no keys"
    console = SerialConsole(live_xml)
    try:
        seen = await console.wait_for_any(BOOT_DONE, BOOT_TIMEOUT_S)
    finally:
        console.close()
    domain_type = re.search(r"<domain type='(\w+)'", live_xml)
    figures.append(
        f"first boot ({domain_type and domain_type.group(1)}, {template_path.name}): "
        f"{seen.decode()!r} after "
        f"{time.monotonic() - began:.1f} s"
    )
    template_hash = content_hash(template_path.read_bytes())
    await wait_persisted_current(run1, vm_id, StateKind.TPM, lambda: disk_tpm_content(vm_id))
    _, nvram1 = await wait_persisted_current(
        run1,
        vm_id,
        StateKind.NVRAM,
        lambda: disk_nvram_content(name),
        accept=lambda content: content_hash(content) != template_hash,
    )
    before = parsed(nvram1, tmp_path / "run1_VARS.fd")
    # The firmware ran on the enrolled template and kept its keys.
    assert_same_secure_boot(before, template)

    # --- power-off: final state retrieved, then the host's copies wiped by the undefine
    assert await client.stop(vm_id, StopMode.POWEROFF), "the final state was not retrieved"
    await wait_event(run1, VmUndefined, is_ours, "vm.undefined after the power-off")
    assert not (SWTPM_ROOT / vm_id).exists(), "the swtpm directory outlived the undefine"
    assert not nvram_path(name).exists(), "the NVRAM file outlived the undefine"
    newest_nvram = newest_persisted(run1, vm_id, StateKind.NVRAM)

    # --- restore: the store's NVRAM is on disk before QEMU starts, and the firmware boots
    run2 = await client.watch_events("vm.*.*", "state.persisted.*")
    capture = RestoreCapture(vm_id, name)
    capture.start()
    try:
        await client.start(vm_id, host)
    finally:
        capture.stop()
    assert capture.nvram is not None, "the restore wrote no NVRAM"
    assert content_hash(capture.nvram) == newest_nvram.content_hash
    restored = parsed(capture.nvram, tmp_path / "restored_VARS.fd")
    assert_same_secure_boot(restored, before)
    await wait_event(run2, VmStarted, is_ours, "vm.started after the restore")
    console = SerialConsole(_live_xml(vm_id))
    try:
        seen_again = await console.wait_for_any(BOOT_DONE, BOOT_TIMEOUT_S)
    finally:
        console.close()
    # Each boot writes the NVRAM (edk2 counts boots in a variable): the second boot's NVRAM,
    # as persisted, still holds the restored keys with Secure Boot on.
    _, nvram2 = await wait_persisted_current(
        run2,
        vm_id,
        StateKind.NVRAM,
        lambda: disk_nvram_content(name),
        accept=lambda content: content != capture.nvram,
    )
    after = parsed(nvram2, tmp_path / "run2_VARS.fd")
    assert_same_secure_boot(after, before)
    figures.append(f"second boot on the restored NVRAM: {seen_again.decode()!r}")
    figures.extend(
        f"{key}: {len(before.keys[key])} entr{'y' if len(before.keys[key]) == 1 else 'ies'} "
        f"({', '.join(before.subjects(key)) or 'hashes'}) identical in all four NVRAMs"
        for key in ("PK", "KEK", "db", "dbx")
    )

    assert await client.stop(vm_id, StopMode.POWEROFF)
    await wait_event(run2, VmUndefined, is_ours, "vm.undefined after the final power-off")
    codes = await stack.stop_services()
    assert set(codes.values()) == {0}, codes
    for service in stack.services:
        assert b"Traceback" not in service.log_path.read_bytes(), service.log_path
    print("\nSecure Boot figures:")
    for line in figures:
        print(f"  - {line}")
