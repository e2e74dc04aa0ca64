"""``python -m keeper_host_agent install-hook``: install the QEMU hook on this hypervisor.

Copies the hook (``qemu_hook.py``, standard library only) to
``/etc/libvirt/hooks/qemu.d/vtpm-keeper`` (0755) and writes its configuration
(``/etc/vtpm-keeper/qemu-hook.conf``) from the agent's own settings (the same
``KEEPER_HOST_*`` environment; the socket defaults to ``/run/keeper/host-agent.sock``, which
the agent must then serve: set ``KEEPER_HOST_HOOK_SOCKET`` for it), so the hook asks the
socket the agent serves and waits a little longer than the agent's own bounds. libvirtd
reads hooks when it starts: restart it once after the first install (running VMs survive).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from importlib import resources
from pathlib import Path

from keeper_host_agent.hook.settings import DEFAULT_HOOK_SOCKET, HookSettings

HOOK_NAME = "vtpm-keeper"
DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks/qemu.d")
DEFAULT_CONFIG = Path("/etc/vtpm-keeper/qemu-hook.conf")
MARGIN_S = 10.0
"""The hook waits this much longer than the agent, so the agent's own answer (a refusal
with its reason) arrives before the hook gives up on it."""


def hook_config(settings: HookSettings) -> str:
    """The hook's configuration file for an agent with ``settings``."""
    unreachable = "allow" if settings.hook_fail_open else "refuse"
    return (
        "# vTPM Keeper QEMU hook, written by `python -m keeper_host_agent install-hook`.\n"
        f"socket = {settings.hook_socket or DEFAULT_HOOK_SOCKET}\n"
        f"prepare_timeout_s = {settings.hook_prepare_timeout_s + MARGIN_S:g}\n"
        f"stop_timeout_s = {settings.hook_stop_timeout_s + MARGIN_S:g}\n"
        "# refuse: a TPM/UEFI domain does not start while the agent does not answer.\n"
        f"agent_unreachable = {unreachable}\n"
    )


def install(settings: HookSettings, hooks_dir: Path, config_path: Path) -> list[Path]:
    """Write the hook and its configuration; returns the paths written."""
    source = resources.files(__package__).joinpath("qemu_hook.py").read_bytes()
    hooks_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    config_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    hook_path = hooks_dir / HOOK_NAME
    _write_atomically(hook_path, source, 0o755)
    _write_atomically(config_path, hook_config(settings).encode(), 0o644)
    return [hook_path, config_path]


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def main(argv: list[str]) -> None:
    """Parse ``argv`` (after ``install-hook``) and install."""
    parser = argparse.ArgumentParser(prog="python -m keeper_host_agent install-hook")
    parser.add_argument("--hooks-dir", type=Path, default=DEFAULT_HOOKS_DIR)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    for path in install(HookSettings(), args.hooks_dir, args.config):
        print(f"wrote {path}")
    print("restart libvirtd once so it reads the new hook (running VMs survive it)")
