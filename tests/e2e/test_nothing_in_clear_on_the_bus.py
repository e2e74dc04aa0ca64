"""TPM state sealed on the bus: after a real run, nothing in the broker's files, its
dead-letter queues or any service log holds the TPM state or the secret in it.

The stack (store, policy, two host agents with libvirt's test driver) runs against a
RabbitMQ node of this test's own, so its data directory (quorum-queue WAL and segments,
mnesia, the node's logs) holds only this run. A VM whose TPM state carries a known secret is
written on host a, pulled by the store, stopped, and placed on host b (a fetch reply and a
``vm.prepare`` that rest in durable quorum queues). A ``vm.prepare`` host b cannot decode
(a newer schema version, as an older agent sees a newer store's) is dead-lettered with its
state inside. Then the scan must find nothing; and the same scan finds a clear blob planted
the way the previous message versions carried one, so it can fail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from keeper_devtools.localstack import free_tcp_ports
from keeper_devtools.localstack.rabbitmq import RabbitMQConfig, RabbitMQNode
from keeper_devtools.swtpm_lab import permall_framing
from keeper_shared.bus.topology import COMMANDS_EXCHANGE, host_command_key, host_command_queue
from keeper_shared.messages.envelope import encode, new_envelope
from keeper_shared.messages.placement import StopMode
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.messages.vm import PrepareVm
from keeper_shared.sealing.state_blobs import seal_state_blob
from keeper_shared.state_format.blobs import content_hash, seal_blob
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from support.broker import Broker
from support.leak_scan import content_fingerprints, find_leaks, leak_forms, read_files
from support.policy_stack import STEP_TIMEOUT_S, PolicyStack
from support.sealing_keys import public_key_of
from support.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.rabbit, pytest.mark.redis]

SECRET = b"BITLOCKER-VMK-" + os.urandom(48).hex().encode()
"""What a guest sealed into its TPM: it sits inside tpm2-00.permall."""


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[Broker, Path]]:
    """A RabbitMQ node for this test alone, and the directory holding all its files."""
    amqp_port, dist_port, epmd_port = free_tcp_ports(3)
    base_dir = tmp_path / "rabbitmq"
    node = RabbitMQNode(
        RabbitMQConfig(
            name=f"keeper-seal-{amqp_port}",
            amqp_port=amqp_port,
            dist_port=dist_port,
            epmd_port=epmd_port,
            base_dir=base_dir,
        )
    )
    node.check_installed()
    node.start()
    try:
        yield Broker(node.amqp_url, node.add_user, node.import_user_definitions), base_dir
    finally:
        node.stop()


def _write_tpm_with_secret(stack: PolicyStack, host: str, vm_id: str) -> bytes:
    """What swtpm writes once the guest sealed ``SECRET``; returns the canonical archive."""
    permall = permall_framing(os.urandom(2048) + SECRET + os.urandom(2048))
    tpm_dir = stack.hosts[host].tpm_dir(vm_id)
    tpm_dir.mkdir(parents=True, exist_ok=True)
    temporary = tpm_dir / "TMP2-00.permall"
    temporary.write_bytes(permall)
    temporary.chmod(0o600)
    temporary.rename(tpm_dir / MAIN_STATE_FILE_NAME)
    return pack_tpm_state({MAIN_STATE_FILE_NAME: permall})


async def _publish_command(amqp_url: str, host_id: str, body: bytes) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(COMMANDS_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=host_command_key(host_id),
        )


async def _dead_letters(amqp_url: str, queue_names: list[str]) -> list[tuple[str, bytes]]:
    """Every message parked in these dead-letter queues, left there (not acknowledged)."""
    parked: list[tuple[str, bytes]] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in queue_names:
            queue = await channel.declare_queue(name, passive=True)
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                parked.append((f"dead letter in {name}", message.body))
    return parked


async def _dead_letter_count(amqp_url: str, name: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        return count if count is not None else 0


def _scan(
    broker_dir: Path, logs: list[Path], dead_letters: list[tuple[str, bytes]], needles: list[bytes]
) -> list[str]:
    haystacks = [*read_files([broker_dir, *logs]), *dead_letters]
    return find_leaks(haystacks, needles)


async def test_no_tpm_state_or_secret_rests_in_clear_in_the_broker_dlqs_or_logs(
    own_broker: tuple[Broker, Path], redis_url: str, tmp_path: Path
) -> None:
    broker, broker_dir = own_broker
    async with PolicyStack(broker, redis_url, tmp_path / "stack") as stack:
        host_b = stack.host_id("b")
        spec = await stack.new_vm("a")
        archive = _write_tpm_with_secret(stack, "a", spec.vm_id)
        await stack.events.wait_for(
            StatePersisted,
            lambda e: e.vm_id == spec.vm_id and e.content_hash == content_hash(archive),
            STEP_TIMEOUT_S,
        )
        await stack.client.stop_vm(spec.vm_id, StopMode.SHUTDOWN)
        await stack.client.place(spec.vm_id, host_b)
        moved = stack.hosts["b"].tpm_dir(spec.vm_id) / MAIN_STATE_FILE_NAME
        assert SECRET in moved.read_bytes(), "the state did not travel: nothing was proven"

        # A vm.prepare host b cannot decode (as an older agent reads a newer store's): it is
        # dead-lettered with the state inside, sealed as the store seals it.
        blob = seal_blob(StateKind.TPM, archive, FencingToken(epoch=1, generation=1))
        sealed = seal_state_blob(
            spec.vm_id, blob, public_key_of(stack.hosts["b"].sealing_key_file), command_epoch=9
        )
        refused = PrepareVm(vm_id=spec.vm_id, name=spec.name, epoch=9, tpm=sealed)
        document = json.loads(encode(new_envelope(refused, source="state-store", subject=host_b)))
        document["schema_version"] = PrepareVm.schema_version + 1
        await _publish_command(stack.amqp_url, host_b, json.dumps(document).encode())
        dead_letter_queue = host_command_queue(host_b).dead_letter_queue

        async def parked(count: int) -> bool:
            return await _dead_letter_count(stack.amqp_url, dead_letter_queue) >= count

        await wait_until(lambda: parked(1), "the refused vm.prepare to be dead-lettered")
        logs = sorted(stack.work_dir.glob("*.log"))
        dead_letter_queues = [
            dead_letter_queue,
            host_command_queue(stack.host_id("a")).dead_letter_queue,
        ]
        needles = leak_forms(SECRET) + content_fingerprints(archive)

        assert logs, "the services wrote no logs: nothing was scanned"
        dead_letters = await _dead_letters(stack.amqp_url, dead_letter_queues)
        assert len(dead_letters) == 1
        assert _scan(broker_dir, logs, dead_letters, needles) == []

        # The same scan finds a blob that travels in clear, as v2 of vm.prepare carried it.
        clear = json.loads(json.dumps(document))
        clear["schema_version"] = 2
        clear["data"]["tpm"] = {
            **{key: value for key, value in document["data"]["tpm"].items() if key != "sealed"},
            "compressed": blob.model_dump(mode="json")["compressed"],
        }
        await _publish_command(stack.amqp_url, host_b, json.dumps(clear).encode())
        await wait_until(lambda: parked(2), "the planted clear vm.prepare to be dead-lettered")
        dead_letters = await _dead_letters(stack.amqp_url, dead_letter_queues)
        found = _scan(broker_dir, logs, dead_letters, needles)
        assert f"dead letter in {dead_letter_queue}" in found
        assert any(name.startswith(str(broker_dir)) for name in found), found
