"""``vm.set-epoch`` on an in-memory hypervisor: the epoch goes into the domain's metadata and
the domain is re-read, only forwards, a repeat changes nothing, and a domain this host does
not have is a refusal, not an exception. (Against libvirt: test_placement_epoch_command.)"""

from __future__ import annotations

import uuid

from keeper_host_agent.commands.placement import PlacementCommands, epoch_in
from keeper_host_agent.hypervisor.port import Hypervisor
from keeper_shared.bus.client import Delivery
from keeper_shared.domain_metadata import PLACEMENT_NAMESPACE
from keeper_shared.messages.envelope import new_envelope
from keeper_shared.messages.replies import SetPlacementEpochReply
from keeper_shared.messages.vm_control import SetPlacementEpoch
from support.fake_hypervisor import FakeDomain, FakeHypervisor

DELIVERY = Delivery(user_id=None, redelivered=False, reply_to=None, correlation_id=None)


class Refreshes:
    """Stands in for the agent's re-read of a domain."""

    def __init__(self) -> None:
        self.vm_ids: list[str] = []

    async def __call__(self, vm_id: str) -> None:
        self.vm_ids.append(vm_id)


async def set_epoch(commands: PlacementCommands, vm_id: str, epoch: int) -> SetPlacementEpochReply:
    envelope = new_envelope(SetPlacementEpoch(vm_id=vm_id, epoch=epoch), source="t", subject=vm_id)
    return await commands.set_epoch(envelope, DELIVERY)


def stored_epoch(hypervisor: FakeHypervisor, vm_id: str) -> int:
    return epoch_in(hypervisor.domains[vm_id].metadata.get(PLACEMENT_NAMESPACE))


async def test_a_domain_without_an_epoch_takes_one_and_is_re_read() -> None:
    vm_id = str(uuid.uuid4())
    fake = FakeHypervisor(FakeDomain(vm_id, "migrated"))
    hypervisor: Hypervisor = fake
    refreshes = Refreshes()
    commands = PlacementCommands(hypervisor, refreshes)

    done = await set_epoch(commands, vm_id, 4)

    assert done.ok, done.error
    assert (done.epoch, done.previous_epoch) == (4, 0)
    assert stored_epoch(fake, vm_id) == 4
    assert refreshes.vm_ids == [vm_id]


async def test_the_epoch_only_moves_forward_and_a_repeat_writes_nothing() -> None:
    vm_id = str(uuid.uuid4())
    placed = FakeDomain(vm_id, "migrated", metadata={PLACEMENT_NAMESPACE: "<placement epoch='2'/>"})
    fake = FakeHypervisor(placed)
    refreshes = Refreshes()
    commands = PlacementCommands(fake, refreshes)

    repeat = await set_epoch(commands, vm_id, 2)
    older = await set_epoch(commands, vm_id, 1)

    assert repeat.ok
    assert (repeat.epoch, repeat.previous_epoch) == (2, 2)
    assert not older.ok
    assert older.error == "domain runs under epoch 2, newer than 1"
    assert stored_epoch(fake, vm_id) == 2
    assert ("set_metadata", vm_id) not in fake.calls
    assert refreshes.vm_ids == []


async def test_a_domain_this_host_does_not_have_is_refused() -> None:
    fake = FakeHypervisor()
    refreshes = Refreshes()
    commands = PlacementCommands(fake, refreshes)
    missing = str(uuid.uuid4())

    done = await set_epoch(commands, missing, 5)

    assert not done.ok
    assert done.error is not None
    assert missing in done.error
    assert refreshes.vm_ids == []


def test_an_unreadable_epoch_counts_as_none() -> None:
    assert epoch_in(None) == 0
    assert epoch_in("<placement epoch='x'/>") == 0
    assert epoch_in("<placement epoch='-3'/>") == 0
    assert epoch_in("<placement/>") == 0
    assert epoch_in(f"<placement xmlns='{PLACEMENT_NAMESPACE}' epoch='7'/>") == 7
