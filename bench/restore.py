"""Restore: a real ``vm.prepare`` over the bus to the real host agent, timed until its reply
(TPM and NVRAM verified, written to temp files, fsynced, renamed into place)."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

from keeper_shared.bus.client import BusClient
from keeper_shared.bus.topology import host_command_key
from keeper_shared.messages.replies import PrepareVmReply
from keeper_shared.messages.types import StateBlob
from keeper_shared.messages.vm import PrepareVm


async def prepare_calls(
    bus: BusClient,
    host_id: str,
    host_root: Path,
    tpm: StateBlob,
    nvram: StateBlob,
    calls: int,
) -> list[float]:
    """Seconds per PrepareVm call, one at a time; the written state is removed after."""
    samples = []
    for index in range(calls):
        vm_id = str(uuid.uuid4())
        name = f"restore-{index:04d}-{vm_id[:8]}"
        began = time.monotonic()
        reply = await bus.call(
            host_command_key(host_id),
            PrepareVm(vm_id=vm_id, name=name, epoch=1, tpm=tpm, nvram=nvram),
            PrepareVmReply,
            subject=vm_id,
            timeout_s=30,
        )
        samples.append(time.monotonic() - began)
        if not reply.data.ok:
            raise RuntimeError(f"prepare refused: {reply.data.error}")
        shutil.rmtree(host_root / "swtpm" / vm_id, ignore_errors=True)
        (host_root / "nvram" / f"{name}_VARS.fd").unlink(missing_ok=True)
    return samples
