"""A VM is not placed on a host whose swtpm is older than the one that last ran it (that
host runs a ``swtpm`` reporting an older version), unless the placement overrides it; with
the real services as processes, on a stack of its own (host b runs another swtpm).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.messages.placement import StopMode, VmPlaced
from support.broker import Broker
from support.policy_stack import PolicyStack

pytestmark = [pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]


async def test_an_older_swtpm_is_refused_unless_overridden(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    fake_bin = tmp_path / "old-swtpm-bin"
    fake_bin.mkdir()
    fake = fake_bin / "swtpm"
    fake.write_text("#!/bin/sh\necho 'TPM emulator version 0.6.0, Copyright (c) IBM Corp.'\n")
    fake.chmod(0o755)
    real = shutil.which("swtpm")
    if real is None:
        pytest.skip("swtpm is not installed")
    async with PolicyStack(
        rabbitmq_broker,
        redis_url,
        tmp_path / "stack",
        redis_users=redis_users,
        agent_env={"b": {"PATH": f"{fake_bin}:{Path(real).parent}:/usr/bin:/bin"}},
    ) as stack:
        spec = await stack.new_vm("a")  # a runs the installed swtpm
        host_a, host_b = stack.host_id("a"), stack.host_id("b")
        first = await stack.events.wait_for(VmPlaced, lambda e: e.vm_id == spec.vm_id)
        newer = first.data.swtpm_version
        assert newer is not None
        await stack.write_tpm_persisted("a", spec.vm_id)
        await stack.client.stop_vm(spec.vm_id, StopMode.SHUTDOWN)

        with pytest.raises(KeeperRequestError) as refused:
            await stack.client.place(spec.vm_id, host_b)
        assert str(refused.value) == (
            f"host {host_b} runs swtpm 0.6.0, older than swtpm {newer} that last wrote this "
            f"VM's state (on {host_a}); place with override_version to allow it"
        )
        assert await stack.placement(spec.vm_id) == ("", 1)  # nothing happened

        detail = await stack.client.place(spec.vm_id, host_b, override_version=True)
        assert "older than swtpm" in (detail.version_overridden or "")
        placed = await stack.events.wait_for(
            VmPlaced, lambda e: e.vm_id == spec.vm_id and e.host == host_b
        )
        assert placed.data.swtpm_version == "0.6.0"
        assert placed.data.version_overridden is not None
        await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
        # Back to the newer swtpm is always fine.
        await stack.client.place(spec.vm_id, host_a)
        await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
