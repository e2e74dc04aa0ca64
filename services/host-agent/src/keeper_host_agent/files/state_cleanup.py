"""Removing a VM's local TPM and NVRAM state after it was safely retrieved or abandoned."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from keeper_host_agent.files.state_writer import validate_vm_id


def wipe_vm_state(swtpm_root: Path, vm_id: str, nvram_path: Path | None) -> list[str]:
    """Delete ``<swtpm_root>/<vm_id>`` and the NVRAM file; return what was removed.

    libvirt's QEMU driver does this itself on ``undefine --tpm --nvram``; drivers that run
    no swtpm (the ``test:///`` driver) do not, so the agent makes sure. Symlinks are removed
    as links, never followed.
    """
    validate_vm_id(vm_id)
    removed: list[str] = []
    vm_dir = swtpm_root / vm_id
    try:
        info = os.lstat(vm_dir)
    except FileNotFoundError:
        info = None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(vm_dir)
        else:
            vm_dir.unlink()
        removed.append(str(vm_dir))
    if nvram_path is not None:
        try:
            nvram_path.unlink()
            removed.append(str(nvram_path))
        except FileNotFoundError:
            pass
    return removed
