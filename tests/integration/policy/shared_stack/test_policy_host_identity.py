"""A host speaks only for itself (invariant 3), in policy too: with each agent on its own
RabbitMQ user, a host that publishes another host's stop, heartbeat or stranded report is
not heard. Without the check a compromised host B could send ``vm.stopped(host=A,
reason=migrated)`` plus its own ``vm.started`` and have policy move A's VM to itself.
The forged messages are dead-lettered as evidence; the VM stays where it was.
"""

from __future__ import annotations

import uuid

import aio_pika
import pytest

from keeper_shared.bus.topology import POLICY_EVENTS
from keeper_shared.keeper_client.views import vm_status
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.messages.placement import VmEvicted, VmMigrated
from keeper_shared.messages.tpm import TpmStateStranded
from keeper_shared.messages.vm import StopReason, VmStarted, VmStopped
from support.policy_stack import PolicyStack
from support.waiting import wait_until

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="package"),
]


async def dead_lettered_about(amqp_url: str, vm_id: str, host: str) -> set[str]:
    """Types of the messages in policy's events DLQ that mention ``vm_id`` or, for
    heartbeats, name ``host`` (read without taking them away)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(POLICY_EVENTS.dead_letter_queue, passive=True)
        found: set[str] = set()
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            if vm_id.encode() in message.body or f'"host":"{host}"'.encode() in message.body:
                found.add(message.type or "")
        await channel.close()  # unacknowledged messages go back to the queue
        return found
    finally:
        await connection.close()


async def test_a_host_cannot_speak_for_another_host(stack: PolicyStack) -> None:
    spec = await stack.new_vm("a")
    await stack.write_tpm_persisted("a", spec.vm_id)
    host_a, host_b = stack.host_id("a"), stack.host_id("b")
    placed = await stack.placement(spec.vm_id)
    secret_uuid = str(uuid.uuid4())

    def stranded(host: str) -> TpmStateStranded:
        return TpmStateStranded(
            vm_id=spec.vm_id, host=host, secret_uuid=secret_uuid, reason="unreadable"
        )

    # Host b, with its own broker user, claims to be host a: its VM left by migration,
    # a heartbeat with nothing on it, a stranded state. Its own vm.started is true to
    # its user, so policy hears it, but without the source's stop nothing moves.
    forged_stop = VmStopped(
        vm_id=spec.vm_id, host=host_a, name=spec.name, reason=StopReason.MIGRATED
    )
    forged_beat = HostHeartbeat(
        host=host_a,
        interval_s=0.5,
        capabilities=HostCapabilities(
            swtpm_version="0.7.1",
            libvirt_version="9.0.0",
            architectures=["x86_64"],
            uefi_firmware=True,
        ),
        vms=[],
    )
    started_on_b = VmStarted(vm_id=spec.vm_id, host=host_b, name=spec.name)
    await stack.publish_as_host("b", started_on_b, spec.vm_id)
    await stack.publish_as_host("b", forged_stop, spec.vm_id)
    await stack.publish_as_host("b", forged_beat, host_a)
    await stack.publish_as_host("b", stranded(host_a), spec.vm_id)

    forged_types = {"vm.stopped", "host.heartbeat", "tpm.state.stranded"}

    async def all_dead_lettered() -> bool:
        return forged_types <= await dead_lettered_about(stack.amqp_url, spec.vm_id, host_a)

    await wait_until(all_dead_lettered, "policy to dead-letter the forged messages")
    assert await stack.placement(spec.vm_id) == placed
    status = await vm_status(stack.client, spec.vm_id)
    assert status is not None
    assert status.tpm_stranded is None
    assert stack.events.matching(VmMigrated, lambda e: e.vm_id == spec.vm_id) == []
    assert stack.events.matching(VmEvicted, lambda e: e.vm_id == spec.vm_id) == []

    # The same report from host a's own user is acted on: the check, not the pipeline,
    # stopped the forged one.
    await stack.publish_as_host("a", stranded(host_a), spec.vm_id)

    async def marked() -> bool:
        current = await vm_status(stack.client, spec.vm_id)
        return current is not None and current.tpm_stranded is not None

    await wait_until(marked, "the VM to be marked stranded on its own host's word")
