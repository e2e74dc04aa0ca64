"""Policy with the real services as processes, on the package's shared stack:

- a live migration (libvirt reports the domain started on the destination and stopped,
  migrated, on the source; the test driver cannot migrate, so the destination is started
  directly and the source's report is published as its agent would) moves the placement
  to the destination under a new epoch: the source's late write is refused, the source
  removes its copy, the destination takes the new epoch (through the ``vm.set-epoch``
  route, wired as the host agent is asked to wire it) and its writes are stored under it;
- a VM whose TPM state is to be encrypted is not approved for, nor placed on, hosts whose
  libvirt keeps no secrets; a VM whose host cannot read its TPM secret is marked stranded.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from keeper_policy.placement.domain_definition import domain_xml
from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.keeper_client.views import vm_status
from keeper_shared.messages.placement import StopMode, VmEvicted, VmMigrated
from keeper_shared.messages.replies import StartVmReply
from keeper_shared.messages.state import (
    StateChange,
    StateChanged,
    StatePersisted,
    StateWriteRefused,
)
from keeper_shared.messages.tpm import TpmStateStranded, VmSpec
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.messages.vm import StartVm, StopReason, VmStarted, VmStopped
from keeper_shared.redis_access.keys import placement_key, tpm_secret_key
from keeper_shared.redis_access.results import awaited
from support.policy_stack import PolicyStack
from support.waiting import wait_until

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="package"),
]

TPM_XML = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


async def test_live_migration_moves_the_placement_and_fences_the_source(
    stack: PolicyStack,
) -> None:
    spec = await stack.new_vm("a")
    host_a, host_b = stack.host_id("a"), stack.host_id("b")
    migrated_state = await stack.write_tpm_persisted("a", spec.vm_id)

    # libvirt migrates the domain with its swtpm state; it starts on b under the XML
    # (and so the epoch) it had on a.
    shutil.copytree(stack.hosts["a"].tpm_dir(spec.vm_id), stack.hosts["b"].tpm_dir(spec.vm_id))
    xml = domain_xml(
        spec,
        tpm_xml=TPM_XML,
        epoch=1,
        ovmf_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        ovmf_vars_template=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    )
    started = await stack.command_host(
        "b", StartVm(vm_id=spec.vm_id, epoch=1, domain_xml=xml), StartVmReply, spec.vm_id
    )
    assert started.ok, started.error
    await stack.events.wait_for(VmStarted, lambda e: e.vm_id == spec.vm_id and e.host == host_b)
    await stack.publish_as_host(
        "a",
        VmStopped(vm_id=spec.vm_id, host=host_a, name=spec.name, reason=StopReason.MIGRATED),
        spec.vm_id,
    )

    moved = await stack.events.wait_for(VmMigrated, lambda e: e.vm_id == spec.vm_id)
    assert (moved.data.source, moved.data.destination, moved.data.epoch) == (
        host_a,
        host_b,
        2,
    )
    assert await stack.placement(spec.vm_id) == (host_b, 2)

    # The source's late write, as its agent would announce it, is refused.
    await stack.publish_as_host(
        "a",
        StateChanged(
            host=host_a,
            changes=[
                StateChange(
                    vm_id=spec.vm_id,
                    kind=StateKind.TPM,
                    content_hash="ab" * 32,
                    size=4096,
                    token=FencingToken(epoch=1, generation=2**50),
                )
            ],
        ),
        spec.vm_id,
    )
    refused = await stack.events.wait_for(
        StateWriteRefused, lambda e: e.vm_id == spec.vm_id and e.host == host_a
    )
    assert "not the VM's placement" in refused.data.reason
    evicted = await stack.events.wait_for(
        VmEvicted, lambda e: e.vm_id == spec.vm_id and e.host == host_a
    )
    assert evicted.data.placed_on == host_b
    await wait_until(
        lambda: not stack.hosts["a"].tpm_dir(spec.vm_id).exists(), "the source to wipe"
    )

    # The destination takes epoch 2 (its heartbeat confirms it), then its writes are
    # stored under it.
    async def confirmed() -> bool:
        pending = await awaited(stack.redis.hget(placement_key(spec.vm_id), "epoch_pending"))
        return pending is None

    await wait_until(confirmed, "the destination to confirm epoch 2")
    newer = await stack.write_tpm_persisted("b", spec.vm_id)
    (stored,) = stack.events.matching(
        StatePersisted, lambda e: e.vm_id == spec.vm_id and e.content_hash == newer
    )
    assert (stored.data.host, stored.data.token.epoch) == (host_b, 2)
    assert newer != migrated_state
    stopped = await stack.client.stop_vm(spec.vm_id, StopMode.SHUTDOWN)
    assert stopped.retrieved
    assert stopped.host == host_b


async def test_an_encrypted_tpm_is_not_approved_or_placed_where_libvirt_keeps_no_secrets(
    stack: PolicyStack,
) -> None:
    """The simulated hosts' test:/// driver has no secret driver, and their heartbeats say
    so: a TPM whose state is to be encrypted is refused for their cluster (the rule names
    the hosts) unless overridden, and then not placed on them, with the reason."""
    vm_id = str(uuid.uuid4())
    spec = VmSpec(
        vm_id=vm_id, name=f"vm-{vm_id[:8]}", guest_os="windows-11", encrypt_tpm_state=True
    )
    with pytest.raises(KeeperRequestError, match="keeps no secrets") as refused:
        await stack.client.request_tpm(spec)
    assert stack.host_id("a") in str(refused.value)

    approved = await stack.client.request_tpm(spec, override=True)
    assert any("keeps no secrets" in check for check in approved.overridden)
    with pytest.raises(KeeperRequestError, match="libvirt keeps no secrets"):
        await stack.client.place(vm_id, stack.host_id("a"))

    assert not await awaited(stack.redis.hget(placement_key(vm_id), "host"))
    assert not stack.hosts["a"].tpm_dir(vm_id).exists()
    assert not await awaited(stack.redis.exists(tpm_secret_key(vm_id)))


async def test_a_stranded_tpm_reported_by_its_host_shows_in_the_vms_status(
    stack: PolicyStack,
) -> None:
    """A host that finds the VM's TPM state encrypted with a secret it cannot read says
    so; policy marks the VM (only on the word of its placement host) and status shows it."""
    spec = await stack.new_vm("a")
    secret_uuid = str(uuid.uuid4())
    reason = f"secret {secret_uuid} is private: libvirt does not reveal its value"

    def stranded(host: str) -> TpmStateStranded:
        return TpmStateStranded(vm_id=spec.vm_id, host=host, secret_uuid=secret_uuid, reason=reason)

    await stack.publish_as_host("b", stranded(stack.host_id("b")), spec.vm_id)
    await stack.publish_as_host("a", stranded(stack.host_id("a")), spec.vm_id)

    async def marked() -> bool:
        status = await vm_status(stack.client, spec.vm_id)
        return status is not None and status.tpm_stranded is not None

    await wait_until(marked, "the VM to be marked stranded")
    status = await vm_status(stack.client, spec.vm_id)
    assert status is not None
    assert status.protection() == "stranded"
    assert status.tpm_stranded == f"on {stack.host_id('a')}: {reason}"
