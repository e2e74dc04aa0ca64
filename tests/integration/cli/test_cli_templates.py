"""`keeper template` and `keeper vm create --template` against a real state store and
policy's real template handlers (in process, from support.in_process_store, on the
session's RabbitMQ and Redis): a template made from a VM, listed and shown apart from the
VMs, a VM made from it, a template refused where a VM is expected (by name or by id), and
a deletion that asks first."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from typer.testing import CliRunner, Result

from keeper_cli.app import app
from keeper_cli.errors import ExitCode
from keeper_cli.json_documents import FIELDS, schema_id
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.storage.keys import HOST_STATUS
from keeper_policy.storage.scripts import PolicyScripts
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import hosts_key, vm_record_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.storage.version_reader import VersionReader
from keeper_state_store.transfer.moving import read_newest
from support.in_process_store import Store, running_policy_queries, unique

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]


@pytest_asyncio.fixture
async def policy_key(store: Store) -> AsyncIterator[str]:
    """Policy's queries and template commands over the store's Redis, with a live host
    that runs swtpm (so approvals pass); their command key."""
    host = unique("tpl-host")
    beat = HostHeartbeat(
        host=host,
        interval_s=5.0,
        capabilities=HostCapabilities(
            swtpm_version="0.8.0",
            libvirt_version="10.0.0",
            architectures=["x86_64"],
            uefi_firmware=True,
        ),
        vms=[],
    )
    await HostRegistry(store.redis, PolicyScripts(store.redis)).note_heartbeat(beat, time.time())
    try:
        async with running_policy_queries(
            store.amqp_url,
            store.redis,
            lost_after_s=300.0,
            store_target=store.client._store_target,
        ) as key:
            yield key
    finally:
        await awaited(store.redis.hdel(hosts_key(), host))
        await awaited(store.redis.hdel(HOST_STATUS, host))


async def keeper(store: Store, policy_key: str, *arguments: str) -> Result:
    """Run `keeper` as a user would, in a thread (it runs its own event loop)."""
    env = {
        "KEEPER_AMQP_URL": store.amqp_url,
        "KEEPER_STORE_TARGET": store.client._store_target,
        "KEEPER_POLICY_TARGET": policy_key,
        "KEEPER_TIMEOUT_S": "20",
    }
    return await asyncio.to_thread(CliRunner().invoke, app, list(arguments), env=env)


def parsed(result: Result) -> Any:
    """The JSON document on stdout (after any log line of the in-process services)."""
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line[:1] in "[{")
    return json.loads("".join(lines[start:]))


async def stored_kinds(store: Store, vm_id: str) -> set[StateKind]:
    reader = VersionReader(store.repository.redis, store.repository.keys)
    return set(await read_newest(store.repository, reader, vm_id, list(StateKind)))


async def a_vm_that_ran(store: Store, name: str) -> str:
    """A registered Secure Boot VM whose TPM and NVRAM the store holds."""
    vm_id = store.new_vm()
    spec = VmSpec(vm_id=vm_id, name=name, guest_os="windows-11", secure_boot=True)
    record = {"spec": spec.model_dump_json(), "tpm_xml": "<tpm/>"}
    await awaited(store.redis.hset(vm_record_key(vm_id), mapping=record))
    await store.place(vm_id, epoch=1)
    token = FencingToken(epoch=1, generation=1)
    store.host.hold(vm_id, StateKind.TPM, pack_tpm_state({MAIN_STATE_FILE_NAME: b"t" * 64}), token)
    store.host.hold(vm_id, StateKind.NVRAM, b"enrolled keys " + os.urandom(32), token)
    await store.pull(vm_id)
    return vm_id


async def test_a_template_from_a_vm_makes_vms_and_is_deleted_when_confirmed(
    store: Store, policy_key: str
) -> None:
    source = unique("golden")
    source_id = await a_vm_that_ran(store, source)
    template = unique("tpl")

    made = parsed(
        await keeper(
            store, policy_key, "template", "create", template, "--from-vm", source, "--json"
        )
    )

    assert made["schema"] == schema_id("template")
    assert list(made) == ["schema", *FIELDS["template"]]
    assert (made["source_vm_id"], made["nvram"], made["secure_boot"]) == (source_id, True, True)
    template_id = made["template_id"]
    assert await stored_kinds(store, template_id) == {StateKind.NVRAM}
    listed = parsed(await keeper(store, policy_key, "template", "list", "--json"))
    assert template_id in [item["template_id"] for item in listed]
    shown = await keeper(store, policy_key, "template", "show", template)
    assert shown.exit_code == 0, shown.output
    assert "none: each VM gets a new TPM" in shown.stdout
    vms = parsed(await keeper(store, policy_key, "vm", "list", "--json"))
    assert template_id not in [vm["vm_id"] for vm in vms]

    desk = unique("desk")
    created = parsed(
        await keeper(store, policy_key, "vm", "create", desk, "--template", template, "--json")
    )
    assert created["schema"] == schema_id("vm-creation")
    assert (created["template_id"], created["nvram"]) == (template_id, "copied")
    store.vm_ids.append(created["vm_id"])
    assert await stored_kinds(store, created["vm_id"]) == {StateKind.NVRAM}

    as_vm = await keeper(store, policy_key, "vm", "start", template, "--host", store.host.host_id)
    assert as_vm.exit_code == ExitCode.REFUSED, as_vm.output
    assert "is a template, not a VM" in as_vm.stderr
    # By its id too, which names stored state the store holds: the template's NVRAM stays.
    by_id = await keeper(store, policy_key, "vm", "delete-state", template_id, "--yes")
    assert by_id.exit_code == ExitCode.REFUSED, by_id.output
    assert "is a template, not a VM" in by_id.stderr
    assert await stored_kinds(store, template_id) == {StateKind.NVRAM}

    unconfirmed = await keeper(store, policy_key, "template", "delete", template)
    assert unconfirmed.exit_code == ExitCode.ABORTED, unconfirmed.output
    assert "--yes" in unconfirmed.stderr
    assert await stored_kinds(store, template_id) == {StateKind.NVRAM}

    deleted = parsed(
        await keeper(store, policy_key, "template", "delete", template, "--yes", "--json")
    )
    assert (deleted["deleted"], deleted["nvram_versions"]) == (True, 1)
    assert await stored_kinds(store, template_id) == set()
    assert await stored_kinds(store, created["vm_id"]) == {StateKind.NVRAM}
    gone = await keeper(store, policy_key, "template", "show", template)
    assert gone.exit_code == ExitCode.UNKNOWN_VM
    assert "unknown template" in gone.stderr
