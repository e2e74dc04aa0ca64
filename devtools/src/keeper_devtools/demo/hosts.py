"""Two simulated hypervisors: each a libvirt ``test:///`` driver file and a state root.

libvirt's test driver gives real domains and lifecycle events but runs no QEMU and no swtpm,
so on these hosts the demo itself plays what libvirt and the guest would do: manufacture the
TPM on first start, copy the NVRAM template, and run a swtpm the "guest" seals a secret into.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from keeper_shared.state_format.blobs import content_hash
from keeper_shared.state_format.tpm_archive import pack_tpm_state, read_tpm_state_dir

OVMF_VARS_TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
OVMF_VARS_SIZE = 540_672


@dataclass(frozen=True)
class SimulatedHost:
    """One simulated hypervisor host."""

    host_id: str
    root: Path

    @property
    def libvirt_uri(self) -> str:
        """A test driver of its own: its own domains, its own events."""
        return f"test://{self.root / 'libvirt-node.xml'}"

    @property
    def swtpm_root(self) -> Path:
        """Where swtpm state lives on this host (libvirt's /var/lib/libvirt/swtpm)."""
        return self.root / "swtpm"

    @property
    def generation_mark_file(self) -> Path:
        """The agent's generation high-water mark (as /var/lib/vtpm-keeper/generation)."""
        return self.root / "agent" / "generation"

    @property
    def sealing_key_file(self) -> Path:
        """The agent's sealing private key, made on its first start (as
        /var/lib/vtpm-keeper/sealing.key)."""
        return self.root / "agent" / "sealing.key"

    @property
    def nvram_dir(self) -> Path:
        """Where NVRAM files live on this host (libvirt's /var/lib/libvirt/qemu/nvram)."""
        return self.root / "nvram"

    @property
    def snapshot_dir(self) -> Path:
        """Where snapshots with memory keep their memory (the agent's ``snapshot_dir``)."""
        return self.root / "memory-snapshots"

    def create(self) -> None:
        """Lay out an empty host."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "libvirt-node.xml").write_text("<node>\n</node>\n", encoding="utf-8")
        self.swtpm_root.mkdir(mode=0o711, exist_ok=True)
        self.nvram_dir.mkdir(mode=0o711, exist_ok=True)

    def tpm_dir(self, vm_id: str) -> Path:
        """The VM's swtpm state directory on this host."""
        return self.swtpm_root / vm_id / "tpm2"

    def nvram_path(self, vm_name: str) -> Path:
        """The VM's NVRAM file on this host."""
        return self.nvram_dir / f"{vm_name}_VARS.fd"

    def tpm_state_hash(self, vm_id: str) -> str | None:
        """Hash of the VM's canonical TPM state here, None when it has none."""
        try:
            files = read_tpm_state_dir(self.tpm_dir(vm_id))
        except FileNotFoundError:
            return None
        return content_hash(pack_tpm_state(files)) if files else None

    def create_nvram_from_template(self, vm_name: str) -> None:
        """What libvirt does on a UEFI VM's first start: copy the firmware's template."""
        target = self.nvram_path(vm_name)
        if OVMF_VARS_TEMPLATE.exists():
            shutil.copyfile(OVMF_VARS_TEMPLATE, target)
        else:
            target.write_bytes(b"\xff" * OVMF_VARS_SIZE)
        target.chmod(0o600)

    def firmware_writes_variable(self, vm_name: str, offset: int, value: bytes) -> None:
        """What OVMF does at boot: change a variable in place inside the NVRAM file."""
        with self.nvram_path(vm_name).open("r+b") as nvram:
            nvram.seek(offset)
            nvram.write(value)
