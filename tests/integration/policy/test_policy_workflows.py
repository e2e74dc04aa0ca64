"""Policy workflows with the real services as processes:

- a stop survives its policy replica being SIGKILLed mid-retrieval: the workflow's progress
  is in Redis, another replica takes its lease over when it expires and resumes at the
  recorded step (the attempt already made counts), and the client still gets its answer
  (its request is redelivered to the new replica, which joins the workflow);
- a live migration (libvirt reports the domain started on the destination and stopped,
  migrated, on the source; the test driver cannot migrate, so the destination is started
  directly and the source's report is published as its agent would) moves the placement
  to the destination under a new epoch: the source's late write is refused, the source
  removes its copy, the destination takes the new epoch (through the ``vm.set-epoch``
  route, wired as the host agent is asked to wire it) and its writes are stored under it;
- a VM is not placed on a host whose swtpm is older than the one that last ran it (that
  host runs a ``swtpm`` reporting an older version), unless the placement overrides it;
- a VM whose TPM state is to be encrypted is not approved for, nor placed on, hosts whose
  libvirt keeps no secrets; a VM whose host cannot read its TPM secret is marked stranded.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import uuid
from pathlib import Path

import pytest

from keeper_devtools.localstack.redis_users import RedisUsers
from keeper_policy.placement.domain_definition import domain_xml
from keeper_policy.storage.keys import workflow_key
from keeper_shared.keeper_client.client import KeeperRequestError
from keeper_shared.keeper_client.views import vm_status
from keeper_shared.messages.placement import StopMode, VmEvicted, VmMigrated, VmPlaced
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
from support.broker import Broker
from support.policy_stack import STEP_TIMEOUT_S, PolicyStack
from support.waiting import wait_until

pytestmark = [pytest.mark.rabbit, pytest.mark.redis, pytest.mark.libvirt]

TPM_XML = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


async def test_a_stop_survives_its_policy_replica_being_killed(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    async with PolicyStack(rabbitmq_broker, redis_url, tmp_path, redis_users=redis_users) as stack:
        spec = await stack.new_vm("a")
        await stack.write_tpm_persisted("a", spec.vm_id)
        stack.signal("a", signal.SIGSTOP)  # retrievals hang until the host is thawed
        final = stack.write_tpm("a", spec.vm_id)
        stopping = asyncio.create_task(stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF))

        async def retrieving() -> bool:
            attempts = await awaited(stack.redis.hget(workflow_key(spec.vm_id), "attempts"))
            return attempts is not None and int(attempts) >= 1

        await wait_until(retrieving, "the first retrieval attempt to be recorded")
        stack.signal("policy-0", signal.SIGKILL)
        await stack.services["policy-0"].stop()
        stack.signal("a", signal.SIGCONT)
        assert await awaited(stack.redis.exists(workflow_key(spec.vm_id)))  # left mid-way

        stack.services["policy-1"] = stack.policy_process(1)
        await stack.services["policy-1"].start()
        detail = await asyncio.wait_for(stopping, STEP_TIMEOUT_S)

        assert detail.retrieved
        assert detail.attempts >= 2  # the killed replica's attempt was counted
        await stack.events.wait_for(
            StatePersisted,
            lambda e: e.vm_id == spec.vm_id and e.content_hash == final,
        )
        assert not await awaited(stack.redis.exists(workflow_key(spec.vm_id)))
        assert not stack.hosts["a"].tpm_dir(spec.vm_id).exists()
        resumed = stack.services["policy-1"].log_path.read_text()
        assert "workflow running" in resumed
        assert spec.vm_id in resumed


async def test_live_migration_moves_the_placement_and_fences_the_source(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    async with PolicyStack(rabbitmq_broker, redis_url, tmp_path, redis_users=redis_users) as stack:
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


async def test_an_older_swtpm_is_refused_unless_overridden(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    fake_bin = tmp_path / "old-swtpm-bin"
    fake_bin.mkdir()
    fake = fake_bin / "swtpm"
    fake.write_text("#!/bin/sh\necho 'TPM emulator version 0.6.0, Copyright (c) IBM Corp.'\n")
    fake.chmod(0o755)
    real = shutil.which("swtpm")
    if real is None:
        pytest.skip("swtpm is not installed")
    async with PolicyStack(
        rabbitmq_broker,
        redis_url,
        tmp_path / "stack",
        redis_users=redis_users,
        agent_env={"b": {"PATH": f"{fake_bin}:{Path(real).parent}:/usr/bin:/bin"}},
    ) as stack:
        spec = await stack.new_vm("a")  # a runs the installed swtpm
        host_a, host_b = stack.host_id("a"), stack.host_id("b")
        first = await stack.events.wait_for(VmPlaced, lambda e: e.vm_id == spec.vm_id)
        newer = first.data.swtpm_version
        assert newer is not None
        await stack.write_tpm_persisted("a", spec.vm_id)
        await stack.client.stop_vm(spec.vm_id, StopMode.SHUTDOWN)

        with pytest.raises(KeeperRequestError) as refused:
            await stack.client.place(spec.vm_id, host_b)
        assert str(refused.value) == (
            f"host {host_b} runs swtpm 0.6.0, older than swtpm {newer} that last wrote this "
            f"VM's state (on {host_a}); place with override_version to allow it"
        )
        assert await stack.placement(spec.vm_id) == ("", 1)  # nothing happened

        detail = await stack.client.place(spec.vm_id, host_b, override_version=True)
        assert "older than swtpm" in (detail.version_overridden or "")
        placed = await stack.events.wait_for(
            VmPlaced, lambda e: e.vm_id == spec.vm_id and e.host == host_b
        )
        assert placed.data.swtpm_version == "0.6.0"
        assert placed.data.version_overridden is not None
        await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
        # Back to the newer swtpm is always fine.
        await stack.client.place(spec.vm_id, host_a)
        await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)


async def test_a_placement_survives_its_policy_replica_being_killed(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    async with PolicyStack(rabbitmq_broker, redis_url, tmp_path, redis_users=redis_users) as stack:
        spec = await stack.new_vm("a")
        sealed = await stack.write_tpm_persisted("a", spec.vm_id)
        await stack.client.stop_vm(spec.vm_id, StopMode.SHUTDOWN)
        stack.signal("b", signal.SIGSTOP)  # the prepare on b hangs until it is thawed
        placing = asyncio.create_task(stack.client.place(spec.vm_id, stack.host_id("b")))

        async def restoring() -> bool:
            step: object = await awaited(stack.redis.hget(workflow_key(spec.vm_id), "step"))
            return step == b"restore"

        await wait_until(restoring, "the placement to reach its restore step")
        stack.signal("policy-0", signal.SIGKILL)
        await stack.services["policy-0"].stop()
        stack.signal("b", signal.SIGCONT)
        assert await stack.placement(spec.vm_id) == (stack.host_id("b"), 2)  # fenced already

        stack.services["policy-1"] = stack.policy_process(1)
        await stack.services["policy-1"].start()
        detail = await asyncio.wait_for(placing, STEP_TIMEOUT_S)

        assert detail.epoch == 2  # resumed under the epoch it had, not a third one
        assert stack.hosts["b"].tpm_state_hash(spec.vm_id) == sealed
        placed = stack.events.matching(VmPlaced, lambda e: e.vm_id == spec.vm_id)
        assert [(e.data.host, e.data.epoch) for e in placed] == [
            (stack.host_id("a"), 1),
            (stack.host_id("b"), 2),
        ]
        assert not await awaited(stack.redis.exists(workflow_key(spec.vm_id)))
        stopped = await stack.client.stop_vm(spec.vm_id, StopMode.POWEROFF)
        assert stopped.retrieved


async def test_an_encrypted_tpm_is_not_approved_or_placed_where_libvirt_keeps_no_secrets(
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    """The simulated hosts' test:/// driver has no secret driver, and their heartbeats say
    so: a TPM whose state is to be encrypted is refused for their cluster (the rule names
    the hosts) unless overridden, and then not placed on them, with the reason."""
    async with PolicyStack(rabbitmq_broker, redis_url, tmp_path, redis_users=redis_users) as stack:
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
    rabbitmq_broker: Broker, redis_url: str, redis_users: RedisUsers, tmp_path: Path
) -> None:
    """A host that finds the VM's TPM state encrypted with a secret it cannot read says
    so; policy marks the VM (only on the word of its placement host) and status shows it."""
    async with PolicyStack(rabbitmq_broker, redis_url, tmp_path, redis_users=redis_users) as stack:
        spec = await stack.new_vm("a")
        secret_uuid = str(uuid.uuid4())
        reason = f"secret {secret_uuid} is private: libvirt does not reveal its value"

        def stranded(host: str) -> TpmStateStranded:
            return TpmStateStranded(
                vm_id=spec.vm_id, host=host, secret_uuid=secret_uuid, reason=reason
            )

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
