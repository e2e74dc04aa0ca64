"""A host lost mid-run, with the real services as processes.

host-a's agent is SIGKILLed while its VM runs. Policy declares host-a lost after the
configured silence, publishes `host.lost` with the VM's recovery point, and refuses to place
anything on it. The VM is started on host-b from the last persisted state, under a new
epoch. Then host-a comes back the way a rebooted hypervisor does: its libvirt still defines
the domain (epoch 1) and its disk holds a newer TPM state the guest wrote after the last
persist. Its late write is refused by the store (`state.refused`), and policy tells it to
remove the VM without retrieving anything (`host.returned`, `vm.evicted`).

To see the late write reach the store before the clean-up removes it, policy is frozen
(SIGSTOP) while host-a restarts; it is thawed well within the loss limit so host-b is not
declared lost meanwhile.

A start sent to a host whose agent was just SIGKILLed never reaches it: the restore times
out, and the host is declared lost while it waits. The placement is undone as if the start
had never been asked for (the VM runs nowhere and is not `loss-recorded`); only its epoch
stays raised, since the host may yet act on the prepare it was sent.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_host_agent.hypervisor.domain_xml import fill_nvram_path
from keeper_policy.placement.domain_definition import domain_xml
from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.keeper_client.views import vm_status
from keeper_shared.messages.host_loss import HostLost, HostReturned
from keeper_shared.messages.placement import StopMode, VmEvicted, VmPlaced
from keeper_shared.messages.state import StatePersisted, StateWriteRefused
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import StateKind
from support.broker import Broker
from support.policy_stack import STEP_TIMEOUT_S, PolicyStack
from support.waiting import wait_until

pytestmark = [pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]

LOST_AFTER_S = 8.0
QUICK_LOSS_S = 6.0
SLOW_PREPARE_S = 12.0
"""The loss comes well before the restore gives up, as with the defaults (30 s each, the
loss counted from the agent's last heartbeat, before the start was asked for): here at
most QUICK_LOSS_S plus a heartbeat and a liveness check interval (0.5 s each) after the
kill, half the restore's bound, which starts only once the start was asked for."""
TPM_XML = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


@pytest_asyncio.fixture
async def stack(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> AsyncIterator[PolicyStack]:
    async with PolicyStack(
        rabbitmq_broker,
        redis_url,
        tmp_path,
        redis_users=redis_users,
        policy_env={"KEEPER_POLICY_HOST_LOST_AFTER_S": str(LOST_AFTER_S)},
    ) as running:
        yield running


def define_on_reboot(stack: PolicyStack, name: str, spec: VmSpec, epoch: int) -> None:
    """What a rebooted host's libvirt still has: the persistent domain as policy defined it
    (the test driver reads its domains from the node file at start)."""
    host = stack.hosts[name]
    xml = domain_xml(
        spec,
        tpm_xml=TPM_XML,
        epoch=epoch,
        ovmf_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        ovmf_vars_template=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    )
    node = host.root / "libvirt-node.xml"
    node.write_text(f"<node>\n{fill_nvram_path(xml, host.nvram_dir)}\n</node>\n")


async def test_lost_host_is_fenced_its_vm_restarts_elsewhere_and_it_cleans_up(
    stack: PolicyStack,
) -> None:
    spec = await stack.new_vm("a")
    host_a, host_b = stack.host_id("a"), stack.host_id("b")
    last = await stack.write_tpm_persisted("a", spec.vm_id)
    killed_at = time.time()
    stack.signal("a", signal.SIGKILL)
    await stack.services["a"].stop()

    lost = await stack.events.wait_for(HostLost, lambda e: e.host == host_a, STEP_TIMEOUT_S)
    # Its last heartbeat was at most one interval (0.5 s) before the kill.
    assert time.time() - killed_at >= LOST_AFTER_S - 0.5
    assert lost.data.silent_for_s > LOST_AFTER_S
    (point,) = [p for p in lost.data.vms if p.vm_id == spec.vm_id]
    assert point.epoch == 1
    assert point.versions[StateKind.TPM] >= 1
    assert point.age_s is not None
    # Nothing was persisted after the kill, so the recovery point is at least as old as the
    # silence that made the host lost (less the last heartbeat interval).
    assert point.age_s >= LOST_AFTER_S - 1
    with pytest.raises(KeeperRequestError, match="is declared lost"):
        await stack.client.place(spec.vm_id, host_a)

    # Started elsewhere: a new epoch fences host-a, the state is the last persisted one.
    detail = await stack.client.place(spec.vm_id, host_b)
    assert detail.epoch == 2
    assert stack.hosts["b"].tpm_state_hash(spec.vm_id) == last
    assert await stack.placement(spec.vm_id) == (host_b, 2)
    await stack.events.wait_for(VmPlaced, lambda e: e.vm_id == spec.vm_id and e.host == host_b)

    # host-a comes back with the domain and a TPM state newer than anything persisted.
    late = stack.write_tpm("a", spec.vm_id)
    define_on_reboot(stack, "a", spec, epoch=1)
    stack.signal("policy-0", signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        stack.services["a"] = stack.agent_process("a")
        await stack.services["a"].start()
        refused = await stack.events.wait_for(
            StateWriteRefused,
            lambda e: e.vm_id == spec.vm_id and e.host == host_a,
            LOST_AFTER_S - 2,
        )
    finally:
        stack.signal("policy-0", signal.SIGCONT)
    assert time.monotonic() - frozen_at < LOST_AFTER_S
    assert "not the VM's placement" in refused.data.reason

    returned = await stack.events.wait_for(HostReturned, lambda e: e.host == host_a)
    assert spec.vm_id in returned.data.to_clean_up
    evicted = await stack.events.wait_for(
        VmEvicted, lambda e: e.vm_id == spec.vm_id and e.host == host_a
    )
    assert evicted.data.placed_on == host_b
    await wait_until(
        lambda: not stack.hosts["a"].tpm_dir(spec.vm_id).exists(), "host-a to wipe the VM"
    )
    # Never older over newer, and never the fenced host's write: the store still serves the
    # last persisted state, and host-b's VM runs on.
    assert (
        stack.events.matching(
            StatePersisted, lambda e: e.vm_id == spec.vm_id and e.content_hash == late
        )
        == []
    )
    assert await stack.placement(spec.vm_id) == (host_b, 2)
    stopped = await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
    assert stopped.retrieved
    assert not any(b"Traceback" in Path(s.log_path).read_bytes() for s in stack.services.values())


async def test_a_start_that_never_reached_its_dead_host_records_no_loss(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    async with PolicyStack(
        rabbitmq_broker,
        redis_url,
        tmp_path,
        redis_users=redis_users,
        policy_env={
            "KEEPER_POLICY_HOST_LOST_AFTER_S": str(QUICK_LOSS_S),
            "KEEPER_POLICY_HOST_COMMAND_TIMEOUT_S": str(SLOW_PREPARE_S),
        },
        store_env={"KEEPER_STORE_PREPARE_TIMEOUT_S": str(SLOW_PREPARE_S)},
    ) as stack:
        spec = await stack.new_vm("a")
        await stack.write_tpm_persisted("a", spec.vm_id)
        await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
        before = await vm_status(stack.client, spec.vm_id)
        assert before is not None
        assert (before.host, before.protection()) == (None, "protected")
        assert await stack.placement(spec.vm_id) == ("", 1)

        host_b = stack.host_id("b")
        stack.signal("b", signal.SIGKILL)
        await stack.services["b"].stop()
        with pytest.raises(KeeperRequestError) as failed:
            await stack.client.place(spec.vm_id, host_b)
        replied_at = time.time()
        assert failed.value.timed_out, failed.value

        lost = await stack.events.wait_for(HostLost, lambda e: e.host == host_b, STEP_TIMEOUT_S)
        declared_at = lost.data.last_seen.timestamp() + lost.data.silent_for_s
        assert declared_at < replied_at  # declared while the start waited for the host
        after = await vm_status(stack.client, spec.vm_id)
        assert after is not None
        assert (after.host, after.lost_from, after.protection()) == (None, None, "protected")
        assert after.kinds == before.kinds  # the stored state is untouched
        # The fence is kept: the prepare sent to host-b may yet be carried out under it.
        assert await stack.placement(spec.vm_id) == ("", 2)

        # Nothing holds the VM to host-b: it starts on host-a, under the next epoch.
        detail = await stack.client.place(spec.vm_id, stack.host_id("a"))
        assert detail.epoch == 3
        assert not any(
            b"Traceback" in Path(s.log_path).read_bytes() for s in stack.services.values()
        )
