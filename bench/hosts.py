"""Simulated hypervisor hosts for the real host agent: a libvirt ``test:///`` node file with
N running domains (TPM + UEFI NVRAM, placement epoch in their metadata), their swtpm state
and NVRAM files, and writers that change them the way swtpm and OVMF do."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.state_format.blobs import content_hash
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state

OVMF_VARS_TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
OVMF_VARS_SIZE = 540_672
TPM_TEMP_FILE_NAME = "TMP2-00.permall"
NVRAM_WRITE_SIZE = 64


def nvram_template() -> bytes:
    """The firmware's VARS template (all 0xff when OVMF is not installed)."""
    if OVMF_VARS_TEMPLATE.exists():
        return OVMF_VARS_TEMPLATE.read_bytes()
    return b"\xff" * OVMF_VARS_SIZE


@dataclass
class BenchVm:
    """One domain on a simulated host, and a mirror of its NVRAM."""

    vm_id: str
    name: str
    tpm_dir: Path
    nvram_path: Path
    nvram: bytearray

    def write_tpm(self, state: bytes) -> str:
        """New TPM state as swtpm writes it (temp file, rename); returns its canonical hash."""
        temp = self.tpm_dir / TPM_TEMP_FILE_NAME
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, state)
        finally:
            os.close(fd)
        os.rename(temp, self.tpm_dir / MAIN_STATE_FILE_NAME)
        return content_hash(pack_tpm_state({MAIN_STATE_FILE_NAME: state}))

    def write_nvram(self, offset: int, value: bytes) -> str:
        """A variable changed in place, as OVMF does; returns the new content's hash."""
        fd = os.open(self.nvram_path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, value, offset)
        finally:
            os.close(fd)
        self.nvram[offset : offset + len(value)] = value
        return content_hash(bytes(self.nvram))


def domain_xml(vm_id: str, name: str, nvram_path: Path, epoch: int) -> str:
    """A running UEFI domain with an emulated TPM 2.0, as the test driver takes it."""
    metadata = (
        f"<metadata><keeper:placement xmlns:keeper='{PLACEMENT_NAMESPACE}' "
        f"epoch='{epoch}'/></metadata>"
        if epoch
        else ""
    )
    return f"""<domain type='test'>
  <name>{name}</name>
  <uuid>{vm_id}</uuid>
  {metadata}
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram>{nvram_path}</nvram>
  </os>
  <devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices>
</domain>
"""


def lay_out_host(
    root: Path,
    count: int,
    *,
    epoch: int,
    tpm_state: bytes,
    sparse_nvram: bool = False,
) -> list[BenchVm]:
    """Create a host root with ``count`` running domains and their first state."""
    swtpm_root = root / "swtpm"
    nvram_dir = root / "nvram"
    for directory in (root, swtpm_root, nvram_dir):
        directory.mkdir(parents=True, exist_ok=True)
    swtpm_root.chmod(0o711)
    nvram_dir.chmod(0o711)
    template = b"" if sparse_nvram else nvram_template()
    vms = []
    domains = []
    for index in range(count):
        vm_id = str(uuid.uuid4())
        name = f"bench-{index:05d}-{vm_id[:8]}"
        tpm_dir = swtpm_root / vm_id / "tpm2"
        tpm_dir.mkdir(parents=True)
        tpm_dir.parent.chmod(0o711)
        tpm_dir.chmod(0o700)
        (tpm_dir / MAIN_STATE_FILE_NAME).write_bytes(tpm_state)
        (tpm_dir / MAIN_STATE_FILE_NAME).chmod(0o600)
        nvram_path = nvram_dir / f"{name}_VARS.fd"
        if sparse_nvram:
            with nvram_path.open("wb") as handle:
                handle.truncate(OVMF_VARS_SIZE)
            mirror = bytearray(OVMF_VARS_SIZE)
        else:
            nvram_path.write_bytes(template)
            mirror = bytearray(template)
        nvram_path.chmod(0o600)
        vms.append(BenchVm(vm_id, name, tpm_dir, nvram_path, mirror))
        domains.append(domain_xml(vm_id, name, nvram_path, epoch))
    (root / "libvirt-node.xml").write_text(
        "<node>\n" + "".join(domains) + "</node>\n", encoding="utf-8"
    )
    return vms
