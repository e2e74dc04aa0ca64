"""Every way a VM stops, with the real services as processes: the final TPM state is
retrieved before the domain is destroyed, and a VM can always be started again.

- shutdown from the manager: the guest goes down, then its state is retrieved, then the
  domain is undefined and the host's copy wiped;
- power-off: the state is retrieved while the VM still runs, then it is destroyed;
- guest-initiated shutdown: the host reports `vm.stopped` (shutdown) with no `vm.stop` at
  all (here the host agent is told to shut the domain down directly, as a guest's own
  power-down looks to libvirt); policy retrieves before undefine by itself;
- crash: libvirt's test driver cannot crash a domain, so the host's `vm.stopped`
  (reason crashed) is published exactly as the host agent would publish it;
- retrieval failing three times: the host agent is frozen (SIGSTOP) so it answers no fetch;
  the destroy goes ahead after three bounded attempts, the loss is recorded with the age of
  the last persisted version, the VM can be placed elsewhere at once, and the frozen host,
  thawed, removes the VM without writing it.

Also: TPM approval against the cluster's heartbeats, with an override recorded.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from keeper_cli.app import app
from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.messages.deletion import StateDeleted, TpmDisabled
from keeper_shared.messages.placement import (
    StateLossRecorded,
    StopMode,
    StopTrigger,
    VmEvicted,
    VmRetired,
)
from keeper_shared.messages.replies import ShutdownVmReply
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.tpm import OsTpmSupport, TpmApproved, VmSpec
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm import ShutdownVm, StopReason, VmStopped, VmUndefined
from keeper_shared.redis_access.keys import placement_key, state_head_key
from keeper_shared.redis_access.results import awaited
from support.events import Seen
from support.policy_stack import STEP_TIMEOUT_S, PolicyStack
from support.waiting import wait_until

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="package"),
]


async def persisted(stack: PolicyStack, vm_id: str, digest: str) -> Seen[StatePersisted]:
    return await stack.events.wait_for(
        StatePersisted,
        lambda e: e.vm_id == vm_id and e.kind is StateKind.TPM and e.content_hash == digest,
        STEP_TIMEOUT_S,
    )


async def retired(stack: PolicyStack, vm_id: str) -> Seen[VmRetired]:
    return await stack.events.wait_for(VmRetired, lambda e: e.vm_id == vm_id, STEP_TIMEOUT_S)


async def undefined(stack: PolicyStack, vm_id: str, host: str) -> Seen[VmUndefined]:
    return await stack.events.wait_for(
        VmUndefined, lambda e: e.vm_id == vm_id and e.host == host, STEP_TIMEOUT_S
    )


def wiped(stack: PolicyStack, name: str, spec: VmSpec) -> bool:
    host = stack.hosts[name]
    return not host.tpm_dir(spec.vm_id).parent.exists() and not host.nvram_path(spec.name).exists()


async def restarts_elsewhere_with(stack: PolicyStack, spec: VmSpec, digest: str) -> None:
    """The VM starts on host b with exactly ``digest`` as its TPM state."""
    await stack.client.place(spec.vm_id, stack.host_id("b"))
    assert stack.hosts["b"].tpm_state_hash(spec.vm_id) == digest
    await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)


async def test_shutdown_retrieves_the_final_state_after_the_guest_is_down(
    stack: PolicyStack,
) -> None:
    spec = await stack.new_vm("a")
    await stack.write_tpm_persisted("a", spec.vm_id)
    final = stack.write_tpm("a", spec.vm_id)  # the guest's last write before shutting down

    detail = await stack.client.stop_vm(spec.vm_id, StopMode.SHUTDOWN)

    assert detail.retrieved
    assert detail.removed
    assert detail.trigger is StopTrigger.SHUTDOWN
    host_a = stack.host_id("a")
    down = await stack.events.wait_for(
        VmStopped,
        lambda e: e.vm_id == spec.vm_id and e.reason is StopReason.SHUTDOWN,
        STEP_TIMEOUT_S,
    )
    gone = await undefined(stack, spec.vm_id, host_a)
    stored = await persisted(stack, spec.vm_id, final)
    assert down.position < gone.position
    assert stored.position < gone.position
    assert wiped(stack, "a", spec)
    assert await stack.placement(spec.vm_id) == ("", 1)
    await restarts_elsewhere_with(stack, spec, final)


async def test_poweroff_retrieves_while_running_then_destroys(stack: PolicyStack) -> None:
    spec = await stack.new_vm("a")
    await stack.write_tpm_persisted("a", spec.vm_id)
    final = stack.write_tpm("a", spec.vm_id)

    detail = await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)

    assert detail.retrieved
    assert detail.trigger is StopTrigger.POWEROFF
    stored = await persisted(stack, spec.vm_id, final)
    destroyed = await stack.events.wait_for(
        VmStopped,
        lambda e: e.vm_id == spec.vm_id and e.reason is StopReason.DESTROYED,
        STEP_TIMEOUT_S,
    )
    gone = await undefined(stack, spec.vm_id, stack.host_id("a"))
    # Retrieved while it still ran: persisted before the destroy, destroyed before undefine.
    assert stored.position < destroyed.position < gone.position
    assert wiped(stack, "a", spec)
    await restarts_elsewhere_with(stack, spec, final)


async def test_guest_shutdown_without_a_stop_request_is_retrieved_before_undefine(
    stack: PolicyStack,
) -> None:
    spec = await stack.new_vm("a")
    await stack.write_tpm_persisted("a", spec.vm_id)
    final = stack.write_tpm("a", spec.vm_id)

    # The guest powers itself down: libvirt reports it stopped (shutdown); nobody asked
    # policy for anything.
    done = await stack.command_host(
        "a", ShutdownVm(vm_id=spec.vm_id, timeout_s=5), ShutdownVmReply, spec.vm_id
    )
    assert done.ok

    event = await retired(stack, spec.vm_id)
    assert event.data.trigger is StopTrigger.GUEST_SHUTDOWN
    assert event.data.retrieved
    assert event.data.removed
    stored = await persisted(stack, spec.vm_id, final)
    gone = await undefined(stack, spec.vm_id, stack.host_id("a"))
    assert stored.position < gone.position
    assert wiped(stack, "a", spec)
    await restarts_elsewhere_with(stack, spec, final)


async def test_crash_reported_by_the_host_is_retrieved_before_undefine(stack: PolicyStack) -> None:
    spec = await stack.new_vm("a")
    await stack.write_tpm_persisted("a", spec.vm_id)
    final = stack.write_tpm("a", spec.vm_id)

    # Emulated: the test driver cannot crash a domain, so the host agent's fact is
    # published as it would publish it.
    host_a = stack.host_id("a")
    await stack.publish_as_host(
        "a",
        VmStopped(vm_id=spec.vm_id, host=host_a, name=spec.name, reason=StopReason.CRASHED),
        spec.vm_id,
    )

    event = await retired(stack, spec.vm_id)
    assert event.data.trigger is StopTrigger.CRASHED
    assert event.data.retrieved
    stored = await persisted(stack, spec.vm_id, final)
    gone = await undefined(stack, spec.vm_id, host_a)
    assert stored.position < gone.position
    assert wiped(stack, "a", spec)
    await restarts_elsewhere_with(stack, spec, final)


async def test_a_report_from_a_host_the_vm_is_not_placed_on_changes_nothing(
    stack: PolicyStack,
) -> None:
    spec = await stack.new_vm("a")
    await stack.publish_as_host(
        "b",
        VmStopped(
            vm_id=spec.vm_id, host=stack.host_id("b"), name=spec.name, reason=StopReason.CRASHED
        ),
        spec.vm_id,
    )
    await stack.write_tpm_persisted("a", spec.vm_id)  # a round trip through every service
    assert stack.events.matching(VmRetired, lambda e: e.vm_id == spec.vm_id) == []
    assert await stack.placement(spec.vm_id) == (stack.host_id("a"), 1)
    await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)


async def test_approval_checks_the_cluster_and_records_an_override(stack: PolicyStack) -> None:
    spec = VmSpec(
        vm_id="0c6f3b7e-2a1d-4e5f-8a9b-0c1d2e3f4a5b", name="empty-cluster", guest_os="win11"
    )
    with pytest.raises(KeeperRequestError, match="no live host of cluster lab has reported"):
        await stack.client.request_tpm(spec, cluster="lab")

    detail = await stack.client.request_tpm(spec, cluster="lab", override=True)

    assert detail.guest_os_support is OsTpmSupport.REQUIRED
    approved = await stack.events.wait_for(
        TpmApproved, lambda e: e.vm_id == spec.vm_id, STEP_TIMEOUT_S
    )
    assert approved.data.overridden == [
        "cluster-capability: no live host of cluster lab has reported"
    ]
    assert approved.data.override_requested_by  # who: the bus user, else the sender
    assert approved.data.cluster == "lab"
    # The hosts of the default cluster all report swtpm: no override needed there.
    await stack.client.request_tpm(spec)


async def test_retrieval_failing_three_times_destroys_anyway_and_records_the_loss(
    stack: PolicyStack,
) -> None:
    spec = await stack.new_vm("a")
    last = await stack.write_tpm_persisted("a", spec.vm_id)
    persisted_at = time.time()
    stack.signal("a", signal.SIGSTOP)  # the agent answers nothing from now on
    try:
        stack.write_tpm("a", spec.vm_id)  # the guest goes on writing; nobody will fetch it
        started = time.time()
        detail = await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
        took = time.time() - started
    finally:
        stack.signal("a", signal.SIGCONT)

    assert not detail.retrieved
    assert not detail.removed
    assert detail.attempts == 3
    # Three retrievals, each ended by the store's 1.5 s fetch bound (policy's own is 2 s),
    # then power-off and undefine, each ended by policy's 3 s host command bound.
    assert 3 * 1.5 + 2 * 3.0 <= took < 3 * 2.0 + 2 * 3.0 + 5
    loss = await stack.events.wait_for(
        StateLossRecorded, lambda e: e.vm_id == spec.vm_id, STEP_TIMEOUT_S
    )
    assert loss.data.attempts == 3
    assert "no reply" in (loss.data.reason or "")  # the last attempt's error, said
    assert loss.data.versions[StateKind.TPM] >= 1
    age = loss.data.last_persisted_age_s
    assert age is not None
    # Its age when the loss was recorded: from the last persisted version to the third
    # failed attempt.
    assert started - persisted_at + 3 * 1.5 <= age <= started - persisted_at + took
    event = await retired(stack, spec.vm_id)
    assert not event.data.retrieved
    assert not event.data.removed
    assert await stack.placement(spec.vm_id) == ("", 1)  # fenced at once

    # Thawed, the host reports the VM it should no longer hold and removes it, unretrieved.
    evicted = await stack.events.wait_for(
        VmEvicted, lambda e: e.vm_id == spec.vm_id, STEP_TIMEOUT_S
    )
    assert evicted.data.host == stack.host_id("a")
    await wait_until(lambda: wiped(stack, "a", spec), "host a to wipe the VM")
    # The VM starts elsewhere from the last persisted version; the unretrieved write never
    # reached the store.
    await restarts_elsewhere_with(stack, spec, last)


async def test_logs_hold_no_traceback(stack: PolicyStack) -> None:
    """Runs after the tests above and those of the package's earlier files (on the same
    stack): none of them made a service fail unexpectedly."""
    for service in stack.services.values():
        log = Path(service.log_path).read_bytes()
        assert b"Traceback" not in log, service.name


async def test_disable_tpm_is_refused_while_running_then_deletes_state_and_registration(
    stack: PolicyStack,
) -> None:
    spec = await stack.new_vm("a")
    await stack.write_tpm_persisted("a", spec.vm_id)

    with pytest.raises(KeeperRequestError, match="shut it down first"):
        await stack.client.disable_tpm(spec.vm_id)
    assert await stack.redis.exists(state_head_key(spec.vm_id, StateKind.TPM))

    await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
    _, epoch = await stack.placement(spec.vm_id)
    deleted = await stack.client.disable_tpm(spec.vm_id, reason="decommissioned")

    # The final retrieval found the same content.
    assert deleted.deleted_versions == {StateKind.TPM: 1, StateKind.NVRAM: 0}
    assert deleted.deleted_snapshots == 0
    gone = await stack.events.wait_for(
        StateDeleted, lambda e: e.vm_id == spec.vm_id, STEP_TIMEOUT_S
    )
    assert gone.data.reason == "decommissioned"
    await stack.events.wait_for(TpmDisabled, lambda e: e.vm_id == spec.vm_id, STEP_TIMEOUT_S)
    left = {
        key
        async for key in stack.redis.scan_iter(match=f"keeper:{{{spec.vm_id}}}:*")
        if await stack.redis.ttl(key) < 0  # the stop's result expires by itself
    }
    # Only the placement stays, so a re-enabled VM's epochs keep rising past a stale host's.
    assert left == {placement_key(spec.vm_id).encode()}
    with pytest.raises(KeeperRequestError, match="not registered"):
        await stack.client.place(spec.vm_id, stack.host_id("b"))

    await stack.client.request_tpm(spec)
    await stack.client.place(spec.vm_id, stack.host_id("b"))
    assert (await stack.placement(spec.vm_id))[1] > epoch
    await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)


async def test_keeper_powers_off_several_vms_at_once(stack: PolicyStack) -> None:
    specs = [await stack.new_vm("a"), await stack.new_vm("b")]
    env = {"KEEPER_AMQP_URL": stack.amqp_url}
    ids = [spec.vm_id for spec in specs]

    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["vm", "poweroff", *ids, "--json"], env=env
    )

    assert result.exit_code == 0, result.output
    documents = json.loads(result.stdout)
    assert [(d["vm_id"], d["stopped"], d["retrieved"]) for d in documents] == [
        (vm_id, True, True) for vm_id in ids
    ]
    for vm_id in ids:
        assert (await stack.placement(vm_id))[0] == ""


async def test_keeper_shows_status_and_hosts_from_the_services_without_redis(
    stack: PolicyStack,
) -> None:
    """`status`, `hosts` and names are the policy and store processes' answers: the CLI,
    given a Redis address nothing listens on, shows what they hold."""
    spec = await stack.new_vm("a")
    await stack.write_tpm_persisted("a", spec.vm_id)
    env = {"KEEPER_AMQP_URL": stack.amqp_url, "KEEPER_REDIS_URL": "redis://127.0.0.1:1/0"}
    runner = CliRunner()

    result = await asyncio.to_thread(
        runner.invoke, app, ["vm", "status", spec.name, "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    (status,) = json.loads(result.stdout)
    host, epoch = await stack.placement(spec.vm_id)
    head = await awaited(stack.redis.hget(state_head_key(spec.vm_id, StateKind.TPM), "version"))
    assert (status["vm_id"], status["name"]) == (spec.vm_id, spec.name)
    assert (status["host"], status["epoch"]) == (host, epoch)
    assert host == stack.host_id("a")
    assert head is not None
    assert status["state"]["tpm"]["version"] == int(head)
    assert status["protection"] == "protected"

    async def hosts() -> dict[str, Any]:
        result = await asyncio.to_thread(runner.invoke, app, ["hosts", "--json"], env=env)
        assert result.exit_code == 0, result.output
        return {item["host"]: item for item in json.loads(result.stdout)}

    # A host's VM count comes with its next heartbeat after the start.
    await wait_until(
        lambda: _lists_a_vm(hosts(), stack.host_id("a")), "host a's heartbeat with the VM"
    )
    found = await hosts()
    for name in ("a", "b"):
        assert found[stack.host_id(name)]["status"] == "alive"
    assert found[stack.host_id("a")]["vms"] >= 1


async def _lists_a_vm(hosts: Awaitable[dict[str, Any]], host: str) -> bool:
    return int((await hosts)[host]["vms"]) >= 1
