"""Every command of the contract, sent for real to the real services (a state store, a policy
replica and a host agent on libvirt's ``test:///`` driver, as processes), gets the reply the
contract names for it; and each receiver answers what it cannot take with the error reply.

The cases are parametrised over the contract table itself: a new command without an example
here fails, and so does a handler that answers any other type than its contract's reply (the
reply is decoded strictly as that type). A refusal counts as long as it says why: what is
checked is the shape of the answer (and a few typed facts that cross the wire); the
services' own tests check what they do.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from pydantic import Field, SecretBytes

from keeper_devtools.contract import COMMANDS, ERROR_REPLY, Receiver
from keeper_shared.bus.client import BusClient, CommandRejectedError
from keeper_shared.bus.topology import POLICY, STATE_STORE, host_command_key
from keeper_shared.messages.adoption import AdoptVm, ListUnprotectedVms
from keeper_shared.messages.commands import CommandOutcome, RejectionCode
from keeper_shared.messages.deletion import DeleteState, DisableTpm
from keeper_shared.messages.endorsement import ReadEndorsementKey
from keeper_shared.messages.envelope import Envelope, Payload
from keeper_shared.messages.host_requests import ClaimPlacement, ReadNewestState
from keeper_shared.messages.placement import PlaceVm, StopMode, StopVm
from keeper_shared.messages.queries import DescribeStoredState, ListHosts, ListVms
from keeper_shared.messages.snapshot import CreateSnapshot, DeleteSnapshot, ListSnapshots
from keeper_shared.messages.state import FetchState, ListStateHistory, RestoreState, RetrieveState
from keeper_shared.messages.template import (
    CreateTemplate,
    CreateVmFromTemplate,
    DeleteTemplate,
    ListTemplates,
)
from keeper_shared.messages.tpm import EnableTpm, VmSpec
from keeper_shared.messages.tpm_reset import AcceptTpm
from keeper_shared.messages.transfer import CloneTpm, CloneVm, ExportState, ImportState
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm import PowerOffVm, PrepareVm, ShutdownVm, StartVm, UndefineVm
from keeper_shared.messages.vm_control import (
    DeleteDomainSnapshot,
    ResumeVm,
    RevertDomain,
    SetPlacementEpoch,
    SnapshotDomain,
    SuspendVm,
)
from keeper_shared.messages.vm_snapshot import DeleteVmSnapshot, RevertVm, SnapshotVm
from keeper_shared.sealing.keys import SealingPublicKey
from keeper_shared.sealing.passphrases import export_binding, import_binding, seal_passphrase
from support.broker import Broker
from support.policy_stack import PolicyStack

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="module"),
]

CALL_TIMEOUT_S = 60.0
"""Generous: only a service that never answers reaches it."""

PASSPHRASE = "a passphrase long enough for a bundle"
NOT_A_BUNDLE = b"not a bundle"


class NotACommand(Payload):
    """A well-formed message of a type no receiver takes."""

    message_type = "test.not-a-command"

    vm_id: str = Field(description="Any VM.")


@dataclass(frozen=True)
class Scene:
    """What the examples refer to: a VM that runs on the host with its TPM state stored."""

    vm_id: str
    name: str
    host: str
    store_key: SealingPublicKey


def _new_id() -> str:
    return str(uuid.uuid4())


def _new_spec() -> VmSpec:
    vm_id = _new_id()
    return VmSpec(vm_id=vm_id, name=f"contract-{vm_id[:8]}", guest_os="windows-11")


EXAMPLES: dict[type[Payload], Callable[[Scene], Payload]] = {
    # Host agent: the running VM where a command is harmless, an unknown one elsewhere.
    FetchState: lambda s: FetchState(vm_ids=[s.vm_id], kinds=list(StateKind)),
    PrepareVm: lambda s: PrepareVm(vm_id=_new_id(), name="contract-prepared", epoch=1),
    StartVm: lambda s: StartVm(vm_id=_new_id(), epoch=1, domain_xml="<domain/>"),
    ShutdownVm: lambda s: ShutdownVm(vm_id=_new_id(), timeout_s=1.0),
    PowerOffVm: lambda s: PowerOffVm(vm_id=_new_id()),
    UndefineVm: lambda s: UndefineVm(vm_id=_new_id(), wipe_state=False),
    SetPlacementEpoch: lambda s: SetPlacementEpoch(vm_id=_new_id(), epoch=1),
    SuspendVm: lambda s: SuspendVm(vm_id=_new_id()),
    ResumeVm: lambda s: ResumeVm(vm_id=s.vm_id),
    SnapshotDomain: lambda s: SnapshotDomain(vm_id=_new_id(), snapshot_id="s1", description=""),
    RevertDomain: lambda s: RevertDomain(
        vm_id=_new_id(),
        epoch=1,
        domain_xml="<domain/>",
        snapshot_id="s1",
        snapshot_xml="<domainsnapshot/>",
    ),
    DeleteDomainSnapshot: lambda s: DeleteDomainSnapshot(vm_id=_new_id(), snapshot_id="s1"),
    # State store.
    RetrieveState: lambda s: RetrieveState(vm_id=s.vm_id, host=s.host),
    RestoreState: lambda s: RestoreState(vm_id=_new_id(), name="contract-r", host=s.host, epoch=1),
    ListStateHistory: lambda s: ListStateHistory(vm_id=s.vm_id),
    CreateSnapshot: lambda s: CreateSnapshot(vm_id=s.vm_id, snapshot_id="pinned"),
    DeleteSnapshot: lambda s: DeleteSnapshot(vm_id=s.vm_id, snapshot_id="never-taken"),
    ListSnapshots: lambda s: ListSnapshots(vm_id=s.vm_id),
    CloneVm: lambda s: CloneVm(source_vm_id=s.vm_id, target_vm_id=_new_id(), tpm=CloneTpm.COPY),
    ExportState: lambda s: ExportState(
        vm_id=s.vm_id, passphrase=seal_passphrase(PASSPHRASE, s.store_key, export_binding(s.vm_id))
    ),
    ImportState: lambda s: ImportState(
        bundle=SecretBytes(NOT_A_BUNDLE),
        passphrase=seal_passphrase(PASSPHRASE, s.store_key, import_binding(NOT_A_BUNDLE, None)),
    ),
    DeleteState: lambda s: DeleteState(vm_id=_new_id(), reason="contract test"),
    DescribeStoredState: lambda s: DescribeStoredState(vm_ids=[s.vm_id]),
    ReadEndorsementKey: lambda s: ReadEndorsementKey(vm_id=s.vm_id),
    AcceptTpm: lambda s: AcceptTpm(vm_id=s.vm_id, requested_by="contract test"),
    ReadNewestState: lambda s: ReadNewestState(vm_id=s.vm_id, host=s.host),
    # Policy.
    EnableTpm: lambda s: EnableTpm(spec=_new_spec()),
    CreateTemplate: lambda s: CreateTemplate(template_id=_new_id(), name="tpl", spec=_new_spec()),
    ListTemplates: lambda s: ListTemplates(),
    DeleteTemplate: lambda s: DeleteTemplate(template_id=_new_id()),
    CreateVmFromTemplate: lambda s: CreateVmFromTemplate(
        template_id=_new_id(), vm_id=_new_id(), name="from-template"
    ),
    DisableTpm: lambda s: DisableTpm(vm_id=_new_id(), reason="contract test"),
    PlaceVm: lambda s: PlaceVm(vm_id=s.vm_id, host=s.host),
    StopVm: lambda s: StopVm(vm_id=_new_id(), mode=StopMode.POWEROFF),
    SnapshotVm: lambda s: SnapshotVm(vm_id=s.vm_id, snapshot_id="live"),
    RevertVm: lambda s: RevertVm(vm_id=s.vm_id, snapshot_id="never-taken"),
    DeleteVmSnapshot: lambda s: DeleteVmSnapshot(vm_id=s.vm_id, snapshot_id="never-taken"),
    AdoptVm: lambda s: AdoptVm(vm="no-such-domain", host=s.host),
    ListVms: lambda s: ListVms(),
    ListUnprotectedVms: lambda s: ListUnprotectedVms(),
    ListHosts: lambda s: ListHosts(),
    ClaimPlacement: lambda s: ClaimPlacement(vm_id=_new_id(), host=s.host, name="unknown"),
}
"""One real instance of every command, built against the scene."""

FACTS: dict[type[Payload], Callable[[Any], bool]] = {
    PlaceVm: lambda r: r.ok and r.already_placed and isinstance(r.epoch, int),
    RetrieveState: lambda r: r.ok and isinstance(r.versions[StateKind.TPM], int),
    CreateSnapshot: lambda r: r.ok and r.versions.get(StateKind.TPM, 0) >= 1,
    UndefineVm: lambda r: r.ok and r.was_defined is False,
    StopVm: lambda r: not r.ok and r.timed_out is False,
}
"""What some replies say, as typed values, for the examples above."""


@dataclass
class Callers:
    """The stack, its scene, and who sends: the services' user, and the host's own user
    for what a host asks for itself."""

    stack: PolicyStack
    scene: Scene
    services: BusClient
    host: BusClient


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def callers(
    rabbitmq_broker: Broker, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Callers]:
    async with PolicyStack(
        rabbitmq_broker, redis_url, tmp_path_factory.mktemp("every-command"), host_names=("a",)
    ) as stack:
        spec = await stack.new_vm("a")
        await stack.write_tpm_persisted("a", spec.vm_id)
        host_id = stack.host_id("a")
        services = await BusClient.connect(
            stack.amqp_url, source=f"test/{stack.run_id}-contract", origin="test"
        )
        host = await BusClient.connect(
            stack.host_amqp_url("a"), source=f"host-agent/{host_id}", origin=host_id
        )
        try:
            scene = Scene(spec.vm_id, spec.name, host_id, stack.store_sealing_key)
            yield Callers(stack, scene, services, host)
        finally:
            await host.close()
            await services.close()


CASES = [
    pytest.param(command, receiver, id=f"{receiver.value}:{command.message_type}")
    for command, contract in COMMANDS.items()
    for receiver in contract.receivers
]


def _send(
    callers: Callers, receiver: Receiver, payload: Payload, reply_type: type[Payload]
) -> Awaitable[Envelope[Payload]]:
    """The call of ``payload`` to ``receiver``, as its senders make it."""
    scene = callers.scene
    if receiver is Receiver.HOST:
        return callers.services.call(
            host_command_key(scene.host),
            payload,
            reply_type,
            subject=scene.vm_id,
            timeout_s=CALL_TIMEOUT_S,
            replier=scene.host,
        )
    by_host = receiver in (Receiver.STATE_STORE_FOR_HOSTS, Receiver.POLICY_FOR_HOSTS)
    to_store = receiver in (Receiver.STATE_STORE, Receiver.STATE_STORE_FOR_HOSTS)
    return (callers.host if by_host else callers.services).call(
        STATE_STORE if to_store else POLICY,
        payload,
        reply_type,
        subject=scene.vm_id,
        timeout_s=CALL_TIMEOUT_S,
        host_request=by_host,
    )


@pytest.mark.parametrize(("command", "receiver"), CASES)
async def test_the_command_gets_its_contract_reply(
    callers: Callers, command: type[Payload], receiver: Receiver
) -> None:
    build = EXAMPLES.get(command)
    assert build is not None, f"add an example of {command.__name__} to EXAMPLES"
    payload = build(callers.scene)
    assert isinstance(payload, command)
    expected = COMMANDS[command].reply

    # Decoded strictly as the contract's reply: another type raises MessageError, and the
    # error reply CommandRejectedError (a valid command must be taken).
    reply = (await _send(callers, receiver, payload, expected)).data

    assert type(reply) is expected
    if isinstance(reply, CommandOutcome) and not reply.ok:
        assert reply.error, f"{command.message_type} refused without a reason"
    fact = FACTS.get(command)
    assert fact is None or fact(reply), reply


@pytest.mark.parametrize("receiver", list(Receiver), ids=[r.value for r in Receiver])
async def test_a_command_the_receiver_cannot_take_gets_the_error_reply(
    callers: Callers, receiver: Receiver
) -> None:
    """A type no receiver handles on that queue: answered ``command.rejected``."""
    stranger = NotACommand(vm_id=callers.scene.vm_id)
    with pytest.raises(CommandRejectedError) as rejected:
        await _send(callers, receiver, stranger, ERROR_REPLY)
    assert rejected.value.code is RejectionCode.UNKNOWN_TYPE
    assert rejected.value.reason


async def test_every_command_of_the_contract_has_an_example() -> None:
    assert set(EXAMPLES) == set(COMMANDS)
