"""Adoption and reconnect reconciliation with the real services as processes, on simulated
hosts whose libvirt (``test:///`` node files) holds domains vTPM Keeper never defined:

- a TPM domain another manager defined and runs is adopted on a host in mode `all`: placed
  where it is under a new epoch, neither redefined nor restarted, and its state stored;
- on a host in mode `none` it is left unprotected with the reason, and `keeper vm adopt`
  adopts it;
- a domain the approval rules refuse is reported with the reasons and left alone;
- a VM stopped while its host agent was down is retired (final state retrieved, then the
  domain removed) once the agent is back.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keeper_cli.app import app
from keeper_policy.placement.domain_definition import domain_xml
from keeper_shared.messages.adoption import UnprotectedVmView, VmAdopted, VmDiscovered
from keeper_shared.messages.placement import StopTrigger, VmRetired
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import StateKind
from keeper_shared.messages.vm import VmStarted, VmStopped, VmUndefined
from keeper_shared.redis_access.keys import vm_record_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.blobs import content_hash
from support.foreign_domains import define_in_node, foreign_domain_xml, shut_off
from support.policy_stack import STEP_TIMEOUT_S, PolicyStack
from support.waiting import wait_until

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="package"),
]

NVRAM_SIZE = 540_672


async def restart_agent(stack: PolicyStack, name: str, *domains: str) -> None:
    """Stop host ``name``'s agent, give its libvirt ``domains``, start it again."""
    await stack.services[name].stop(grace_s=10)
    define_in_node(stack.hosts[name], *domains)
    stack.services[name] = stack.agent_process(
        name, **({"KEEPER_HOST_ADOPT": "all"} if name == "a" else {"KEEPER_HOST_ADOPT": "none"})
    )
    await stack.services[name].start()


def write_nvram(stack: PolicyStack, host: str, name: str) -> str:
    """The VM's NVRAM as the firmware left it; returns its hash."""
    content = bytes(range(256)) * (NVRAM_SIZE // 256)
    path = stack.hosts[host].nvram_path(name)
    path.write_bytes(content)
    path.chmod(0o600)
    return content_hash(content)


async def unprotected(stack: PolicyStack, vm_id: str) -> UnprotectedVmView:
    """Policy's view of a domain it did not adopt, once it has one."""
    found: list[UnprotectedVmView] = []

    async def listed() -> bool:
        found[:] = [v for v in await stack.client.list_unprotected() if v.vm_id == vm_id]
        return bool(found)

    await wait_until(listed, "policy to list the domain as not protected", STEP_TIMEOUT_S)
    return found[0]


def stored_as(vm_id: str, kind: StateKind, digest: str) -> Callable[[StatePersisted], bool]:
    """Matches the store's announcement of exactly this state."""
    return lambda e: e.vm_id == vm_id and e.kind is kind and e.content_hash == digest


def keeper(stack: PolicyStack, *arguments: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(arguments), env={"KEEPER_AMQP_URL": stack.amqp_url})
    return result.exit_code, result.stdout, result.stderr


async def test_a_domain_another_manager_defined_is_adopted_and_its_state_stored(
    stack: PolicyStack,
) -> None:
    vm_id, name = str(uuid.uuid4()), f"foreign-{uuid.uuid4().hex[:6]}"
    tpm = stack.write_tpm("a", vm_id)
    nvram = write_nvram(stack, "a", name)
    await restart_agent(stack, "a", foreign_domain_xml(vm_id, name))

    adopted = await stack.events.wait_for(VmAdopted, lambda e: e.vm_id == vm_id, STEP_TIMEOUT_S)
    assert adopted.data.host == stack.host_id("a")
    assert adopted.data.requested_by is None  # the host's mode adopted it
    for kind, digest in ((StateKind.TPM, tpm), (StateKind.NVRAM, nvram)):
        await stack.events.wait_for(StatePersisted, stored_as(vm_id, kind, digest), STEP_TIMEOUT_S)
    assert await stack.placement(vm_id) == (stack.host_id("a"), adopted.data.epoch)
    record = await awaited(stack.redis.hgetall(vm_record_key(vm_id)))
    spec = VmSpec.model_validate_json(record[b"spec"])
    assert (spec.name, spec.guest_os, spec.memory_mib, spec.machine) == (name, "win11", 1024, "q35")
    # Neither redefined nor restarted: libvirt reported no lifecycle change of it.
    for fact in (VmStarted, VmStopped, VmUndefined):
        assert stack.events.matching(fact, lambda e: e.vm_id == vm_id) == []
    # A later change is stored under the adoption's epoch, as for any placed VM.
    await stack.write_tpm_persisted("a", vm_id)


async def test_a_host_in_mode_none_leaves_it_unprotected_until_keeper_vm_adopt(
    stack: PolicyStack,
) -> None:
    vm_id, name = str(uuid.uuid4()), f"manual-{uuid.uuid4().hex[:6]}"
    tpm = stack.write_tpm("b", vm_id)
    await restart_agent(stack, "b", foreign_domain_xml(vm_id, name))

    view = await unprotected(stack, vm_id)
    assert view.host == stack.host_id("b")
    assert view.running
    assert any(reason.startswith("adoption: ") for reason in view.reasons), view.reasons
    assert await stack.placement(vm_id) == ("", 0)
    code, stdout, _ = await asyncio.to_thread(keeper, stack, "vm", "status", "--json")
    assert code == 0
    (shown,) = [item for item in json.loads(stdout) if item["vm_id"] == vm_id]
    assert shown["protection"] == "not-adopted"
    assert shown["reasons"] == view.reasons

    code, stdout, stderr = await asyncio.to_thread(keeper, stack, "vm", "adopt", name, "--json")

    assert code == 0, stderr
    result = json.loads(stdout)
    assert (result["adopted"], result["vm_id"]) == (True, vm_id)
    assert result["host"] == stack.host_id("b")
    await stack.events.wait_for(
        StatePersisted,
        lambda e: e.vm_id == vm_id and e.kind is StateKind.TPM and e.content_hash == tpm,
        STEP_TIMEOUT_S,
    )
    adopted = await stack.events.wait_for(VmAdopted, lambda e: e.vm_id == vm_id, STEP_TIMEOUT_S)
    assert adopted.data.requested_by is not None
    assert all(v.vm_id != vm_id for v in await stack.client.list_unprotected())


async def test_a_domain_the_rules_refuse_is_reported_with_reasons_and_left_alone(
    stack: PolicyStack,
) -> None:
    vm_id, name = str(uuid.uuid4()), f"refused-{uuid.uuid4().hex[:6]}"
    stack.write_tpm("a", vm_id)
    refused = foreign_domain_xml(vm_id, name, uefi=False, tpm_version="1.2")
    await restart_agent(stack, "a", refused)

    view = await unprotected(stack, vm_id)
    assert any(reason.startswith("firmware: ") for reason in view.reasons), view.reasons
    assert any(reason.startswith("tpm-version: ") for reason in view.reasons), view.reasons
    assert view.running
    assert await stack.placement(vm_id) == ("", 0)
    assert not await awaited(stack.redis.exists(vm_record_key(vm_id)))
    assert stack.events.matching(VmAdopted, lambda e: e.vm_id == vm_id) == []
    assert stack.events.matching(VmUndefined, lambda e: e.vm_id == vm_id) == []

    code, _, stderr = await asyncio.to_thread(keeper, stack, "vm", "adopt", vm_id, "--override")
    assert code == 1
    assert "firmware: " in stderr
    # Reported again after a reconnect, it is still refused and still there.
    await restart_agent(stack, "a", refused)
    await stack.events.wait_for_count(
        VmDiscovered, 2, lambda e: e.vm_id == vm_id, timeout_s=STEP_TIMEOUT_S
    )
    assert (await unprotected(stack, vm_id)).reasons == view.reasons
    assert stack.events.matching(VmUndefined, lambda e: e.vm_id == vm_id) == []


async def test_a_vm_stopped_while_its_agent_was_down_is_retired_after_the_agent_returns(
    stack: PolicyStack,
) -> None:
    spec = await stack.new_vm("a")
    host_a = stack.host_id("a")
    _, epoch = await stack.placement(spec.vm_id)
    await stack.write_tpm_persisted("a", spec.vm_id)

    # The agent goes down; the guest writes its TPM once more and shuts down meanwhile.
    await stack.services["a"].stop(grace_s=10)
    final = stack.write_tpm("a", spec.vm_id)
    placed = domain_xml(
        spec,
        tpm_xml="<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>",
        epoch=epoch,
        ovmf_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        ovmf_vars_template=Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    )
    await restart_agent(stack, "a", shut_off(placed))

    missed = await stack.events.wait_for(
        VmStopped, lambda e: e.vm_id == spec.vm_id and e.missed, STEP_TIMEOUT_S
    )
    assert missed.data.host == host_a
    retired = await stack.events.wait_for(
        VmRetired, lambda e: e.vm_id == spec.vm_id, STEP_TIMEOUT_S
    )
    assert retired.data.trigger is StopTrigger.FOUND_STOPPED
    assert retired.data.retrieved
    assert retired.data.removed
    stored = await stack.events.wait_for(
        StatePersisted,
        lambda e: e.vm_id == spec.vm_id and e.kind is StateKind.TPM and e.content_hash == final,
        STEP_TIMEOUT_S,
    )
    gone = await stack.events.wait_for(
        VmUndefined, lambda e: e.vm_id == spec.vm_id and e.host == host_a, STEP_TIMEOUT_S
    )
    assert stored.position < gone.position
    assert (await stack.placement(spec.vm_id))[0] == ""
