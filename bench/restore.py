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
from keeper_shared.sealing.keys import SealingPublicKey, load_private_key
from keeper_shared.sealing.state_blobs import seal_state_blob


async def prepare_calls(
    bus: BusClient,
    host_id: str,
    host_root: Path,
    tpm: StateBlob,
    nvram: StateBlob,
    calls: int,
) -> list[float]:
    """Seconds per PrepareVm call, one at a time; the written state is removed after. The
    blobs are sealed to the host's key (as the store does) before the clock starts: the
    host's opening is part of the time, the store's sealing is not."""
    host_key = SealingPublicKey(load_private_key(host_root / "sealing.key").public_key())
    samples = []
    for index in range(calls):
        vm_id = str(uuid.uuid4())
        name = f"restore-{index:04d}-{vm_id[:8]}"
        prepare = PrepareVm(
            vm_id=vm_id,
            name=name,
            epoch=1,
            tpm=seal_state_blob(vm_id, tpm, host_key, command_epoch=1),
            nvram=seal_state_blob(vm_id, nvram, host_key, command_epoch=1),
        )
        began = time.monotonic()
        reply = await bus.call(
            host_command_key(host_id),
            prepare,
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
