"""A VM is not placed on a host whose swtpm is older than the one that last ran it (host c
of the package's stack runs a ``swtpm`` reporting an older version), unless the placement
overrides it; with the real services as processes.
"""

from __future__ import annotations

import shutil

import pytest

from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.messages.placement import StopMode, VmPlaced
from support.policy_stack import PolicyStack

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="package"),
]


async def test_an_older_swtpm_is_refused_unless_overridden(stack: PolicyStack) -> None:
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    spec = await stack.new_vm("a")  # a runs the installed swtpm
    host_a, host_c = stack.host_id("a"), stack.host_id("c")
    first = await stack.events.wait_for(VmPlaced, lambda e: e.vm_id == spec.vm_id)
    newer = first.data.swtpm_version
    assert newer is not None
    await stack.write_tpm_persisted("a", spec.vm_id)
    await stack.client.stop_vm(spec.vm_id, StopMode.SHUTDOWN)

    with pytest.raises(KeeperRequestError) as refused:
        await stack.client.place(spec.vm_id, host_c)
    assert str(refused.value) == (
        f"host {host_c} runs swtpm 0.6.0, older than swtpm {newer} that last wrote this "
        f"VM's state (on {host_a}); place with override_version to allow it"
    )
    assert await stack.placement(spec.vm_id) == ("", 1)  # nothing happened

    detail = await stack.client.place(spec.vm_id, host_c, override_version=True)
    assert "older than swtpm" in (detail.version_overridden or "")
    placed = await stack.events.wait_for(
        VmPlaced, lambda e: e.vm_id == spec.vm_id and e.host == host_c
    )
    assert placed.data.swtpm_version == "0.6.0"
    assert placed.data.version_overridden is not None
    await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
    # Back to the newer swtpm is always fine.
    await stack.client.place(spec.vm_id, host_a)
    await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
