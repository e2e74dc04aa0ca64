"""Bad input through the bus reaches the real service processes and costs nothing.

One host agent, one store and one policy replica run as processes. Into each of their
queues go a body that is not JSON, one of an unknown schema version, and (into the store's
events) one larger than any message may be; into the host's queue a ``vm.prepare`` for a VM
id that climbs out of its directory, one whose domain name does, and one whose TPM archive
holds a member that does; into the store's events a poison ``state.changed`` whose handler
fails on every delivery (its host has no agent). It proves:

- every undecodable message is dead-lettered at once, the poison one after the delivery
  limit, and every crafted prepare is refused with an answer;
- no service exits or restarts (no crash loop) and the store still stores afterwards;
- nothing was written outside its place.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import aio_pika
import pytest

from chaos.harness import (
    ChaosCluster,
    ClusterConfig,
    StateLoad,
    wait_until_stored,
)
from chaos.poison import escaped_files, escaping_archive
from keeper_devtools.demo.processes import READY_EVENTS
from keeper_shared.bus.topology import (
    POLICY_COMMANDS,
    STATE_STORE_COMMANDS,
    STATE_STORE_EVENTS,
    QueueSpec,
    host_command_key,
    host_command_queue,
)
from keeper_shared.messages.envelope import MAX_MESSAGE_BYTES, Payload, encode, new_envelope
from keeper_shared.messages.placement import PlaceVm
from keeper_shared.messages.replies import PrepareVmReply
from keeper_shared.messages.state import RestoreState, StateChange, StateChanged
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.messages.vm import PrepareVm
from keeper_shared.redis_access.keys import placement_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.sealing.state_blobs import seal_state_blob
from keeper_shared.state_format.blobs import seal_blob
from support.bus_clients import ConnectBus
from support.sealing_keys import public_key_of
from support.waiting import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]

ESCAPING_VM_ID = "../../../tmp/keeper-escaped"
ESCAPING_NAME = "../../keeper-escaped"
DEAD_LETTER_TIMEOUT_S = 90.0
"""Generous: the poison message waits out the requeue backoff of every delivery."""
REPLY_TIMEOUT_S = 30.0


def unknown_version(payload: Payload, subject: str) -> bytes:
    """A well-formed message of a type the queue handles, from a schema this build lacks."""
    document = json.loads(encode(new_envelope(payload, source="test/bad-input", subject=subject)))
    document["schema_version"] = 99
    return json.dumps(document).encode()


def prepare_body(vm_id: str, name: str) -> bytes:
    """A ``vm.prepare`` with whatever ids, bypassing the model's validation."""
    valid = PrepareVm(vm_id=str(uuid.uuid4()), name="ok", epoch=1)
    document = json.loads(encode(new_envelope(valid, source="test/bad-input", subject=vm_id)))
    document["data"].update(vm_id=vm_id, name=name)
    document["subject"] = vm_id
    return json.dumps(document).encode()


async def test_bad_input_is_dead_lettered_refused_and_changes_nothing(
    rabbitmq_url: str, redis_url: str, tmp_path: Path, connect_bus: ConnectBus
) -> None:
    config = ClusterConfig(
        amqp_url=rabbitmq_url,
        redis_url=redis_url,
        work_dir=tmp_path / "chaos",
        hosts=1,
        store_replicas=1,
        policy_replicas=1,
    )
    async with ChaosCluster(config) as cluster:
        host = cluster.hosts[0]
        vm_id = str(uuid.uuid4())
        ghost = f"ghost-{uuid.uuid4().hex[:8]}"
        token = FencingToken(epoch=1, generation=1)
        store_change = StateChanged(
            host=host.host_id,
            changes=[
                StateChange(
                    vm_id=vm_id, kind=StateKind.TPM, content_hash="0" * 64, size=1, token=token
                )
            ],
        )
        restore = RestoreState(vm_id=vm_id, name="chaos-x", host=host.host_id, epoch=1)
        place = PlaceVm(vm_id=vm_id, host=host.host_id)
        prepare = PrepareVm(vm_id=vm_id, name="chaos-x", epoch=1)
        bodies: list[tuple[QueueSpec, list[bytes]]] = [
            (
                STATE_STORE_EVENTS,
                [
                    b"{not json",
                    b"{" + b" " * MAX_MESSAGE_BYTES + b"}",
                    unknown_version(store_change, vm_id),
                ],
            ),
            (STATE_STORE_COMMANDS, [b"\xff\xfe", unknown_version(restore, vm_id)]),
            (POLICY_COMMANDS, [b"[]", unknown_version(place, vm_id)]),
            (
                host_command_queue(host.host_id),
                [
                    b"null",
                    unknown_version(prepare, vm_id),
                    prepare_body(ESCAPING_VM_ID, "chaos-x"),
                    prepare_body(vm_id, ESCAPING_NAME),
                ],
            ),
        ]
        dead_letter_queues = [spec.dead_letter_queue for spec, _ in bodies]
        before = {queue: await cluster.queue_depth(queue) for queue in dead_letter_queues}
        channel = await cluster.recorder.connection.channel()
        for spec, queue_bodies in bodies:
            for body in queue_bodies:
                await channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=spec.name,
                )
        # The poison one: well-formed, but its VM's host has no agent to pull from.
        poison_vm = str(uuid.uuid4())
        await awaited(
            cluster.redis.hset(placement_key(poison_vm), mapping={"host": ghost, "epoch": 1})
        )
        ghost_bus = await connect_bus(source="test/ghost", origin=ghost)
        await ghost_bus.publish_event(
            StateChanged(
                host=ghost,
                changes=[
                    StateChange(
                        vm_id=poison_vm,
                        kind=StateKind.NVRAM,
                        content_hash="1" * 64,
                        size=4096,
                        token=token,
                    )
                ],
            ),
            subject=poison_vm,
        )
        expected = {spec.dead_letter_queue: len(queue_bodies) for spec, queue_bodies in bodies}
        expected[STATE_STORE_EVENTS.dead_letter_queue] += 1

        crafted_vm = str(uuid.uuid4())
        archive = seal_blob(StateKind.TPM, escaping_archive(b"x" * 64), token)
        crafted = PrepareVm(
            vm_id=crafted_vm,
            name="chaos-archive",
            epoch=1,
            tpm=seal_state_blob(
                crafted_vm, archive, public_key_of(host.sealing_key_file), command_epoch=1
            ),
        )
        caller = await connect_bus(source="test/bad-input", origin="test")
        reply = await caller.call(
            host_command_key(host.host_id),
            crafted,
            PrepareVmReply,
            subject=crafted.vm_id,
            timeout_s=REPLY_TIMEOUT_S,
        )

        async def all_parked() -> bool:
            cluster.check_running()
            for queue, count in expected.items():
                if await cluster.queue_depth(queue) - before[queue] < count:
                    return False
            return True

        await wait_until(
            all_parked, "every bad message in its dead-letter queue", DEAD_LETTER_TIMEOUT_S
        )

        # No crash loop: the services never exited, and they still work.
        vms = await cluster.place_vms(per_host=1)
        load = StateLoad(vms)
        load.start()
        await load.stop()
        stored_after_s = await wait_until_stored(cluster, load, DEAD_LETTER_TIMEOUT_S)
        cluster.check_running()
        parked = {queue: await cluster.queue_depth(queue) - before[queue] for queue in before}
        readiness = {
            service.name: cluster.count_log_lines(READY_EVENTS[service.module], [service])
            for service in cluster.services
        }

    assert not reply.data.ok, "a TPM archive with an escaping member was accepted"
    assert parked == expected
    assert stored_after_s is not None, "the store stopped storing after the bad input"
    assert set(readiness.values()) == {1}, f"a service started more than once: {readiness}"
    assert escaped_files(tmp_path) == []
    assert list(tmp_path.rglob("keeper-escaped*")) == []
    assert not Path("/tmp/keeper-escaped").exists()
