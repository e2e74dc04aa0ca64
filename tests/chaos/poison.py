"""Bad input carrying the leak canary, sent through the bus in the middle of a chaos run.

Each message makes a service refuse something (a body that is not JSON, a field that fails
validation, a TPM archive with a path-escaping member, a blob whose hash does not match),
so the canary passes through every error path that logs: afterwards no log may hold it.
"""

from __future__ import annotations

import io
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
from pydantic import SecretBytes

from chaos.harness import ChaosCluster
from keeper_shared.bus.client import BusClient
from keeper_shared.bus.topology import EVENTS_EXCHANGE, event_routing_key, host_command_key
from keeper_shared.messages.envelope import encode, new_envelope
from keeper_shared.messages.replies import PrepareVmReply
from keeper_shared.messages.state import StateChange, StateChanged
from keeper_shared.messages.types import FencingToken, StateBlob, StateKind
from keeper_shared.messages.vm import PrepareVm
from keeper_shared.sealing.state_blobs import seal_state_blob
from keeper_shared.state_format.blobs import seal_blob
from keeper_shared.state_format.compression import compress
from support.sealing_keys import public_key_of

ESCAPING_MEMBER = "../escaped-by-chaos"
"""A member name that would land outside the VM's directory if unpacked naively."""
REPLY_TIMEOUT_S = 30.0


@dataclass
class PoisonOutcome:
    """What was sent and how the hosts answered the bad prepares."""

    sent: int = 0
    prepares_accepted: list[str] = field(default_factory=list)
    """Must stay empty: every crafted prepare must be refused."""
    escaped_files: list[str] = field(default_factory=list)
    """Files named like the escaping member found anywhere under a host (must be none)."""


def escaping_archive(canary: bytes) -> bytes:
    """A ustar archive with a proper state file and a member that climbs out of the dir."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in (("tpm2-00.permall", canary * 4), (ESCAPING_MEMBER, canary)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def mismatched_blob(canary: bytes, token: FencingToken) -> StateBlob:
    """An NVRAM blob whose content is the canary but whose declared hash is another's."""
    honest = seal_blob(StateKind.NVRAM, canary * 8, token)
    return honest.model_copy(update={"compressed": SecretBytes(compress(canary * 9))})


async def send_poison(cluster: ChaosCluster, canary: bytes) -> PoisonOutcome:
    """Send every kind of bad input once, each carrying ``canary``; wait for the prepares'
    answers (the events are dead-lettered or refused asynchronously)."""
    outcome = PoisonOutcome()
    host = cluster.hosts[0]
    bus = await BusClient.connect(
        cluster.config.amqp_url, source="chaos/poison", origin=host.host_id
    )
    try:
        channel = await bus.connection.channel()
        events = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
        changed_key = event_routing_key(StateChanged.message_type, host.host_id)
        await events.publish(aio_pika.Message(b"\x00not json " + canary), routing_key=changed_key)
        outcome.sent += 1
        vm_id = str(uuid.uuid4())
        valid = new_envelope(
            StateChanged(
                host=host.host_id,
                changes=[
                    StateChange(
                        vm_id=vm_id,
                        kind=StateKind.TPM,
                        content_hash="0" * 64,
                        size=len(canary),
                        token=FencingToken(epoch=1, generation=1),
                    )
                ],
            ),
            source="chaos/poison",
            subject=vm_id,
        )
        invalid = encode(valid).replace(
            b'"' + b"0" * 64 + b'"', b'"' + canary.hex().encode() + b'"'
        )
        await events.publish(aio_pika.Message(invalid), routing_key=changed_key)
        outcome.sent += 1
        await channel.close()

        token = FencingToken(epoch=1, generation=1)
        # Sealed to the host, as the store would: what it opens must still not be written.
        host_key = public_key_of(host.sealing_key_file)
        archive_vm, hash_vm = str(uuid.uuid4()), str(uuid.uuid4())
        archive = seal_blob(StateKind.TPM, escaping_archive(canary), token)
        crafted = [
            PrepareVm(
                vm_id=archive_vm,
                name="chaos-poison-archive",
                epoch=1,
                tpm=seal_state_blob(archive_vm, archive, host_key, command_epoch=1),
            ),
            PrepareVm(
                vm_id=hash_vm,
                name="chaos-poison-hash",
                epoch=1,
                nvram=seal_state_blob(
                    hash_vm, mismatched_blob(canary, token), host_key, command_epoch=1
                ),
            ),
        ]
        for prepare in crafted:
            reply = await bus.call(
                host_command_key(host.host_id),
                prepare,
                PrepareVmReply,
                subject=prepare.vm_id,
                timeout_s=REPLY_TIMEOUT_S,
            )
            outcome.sent += 1
            if reply.data.ok:
                outcome.prepares_accepted.append(prepare.name)
    finally:
        await bus.close()
    outcome.escaped_files = [str(path) for path in escaped_files(host.root.parent)]
    return outcome


def escaped_files(root: Path) -> list[Path]:
    """Files named like the escaping member anywhere under ``root``."""
    name = Path(ESCAPING_MEMBER).name
    return list(root.rglob(name))
