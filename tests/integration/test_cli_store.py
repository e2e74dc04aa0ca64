"""`keeper` against a real state store (the in-process store of support.in_process_store on the
session's RabbitMQ and Redis): status, history, snapshots, export and import, with --json
parsed as a script would, and the errors a user meets."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from keeper_cli.app import app
from keeper_cli.errors import ExitCode
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import hosts_key, placement_key, vm_record_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from support.in_process_store import Store, unique

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]


async def keeper(store: Store, redis_url: str, *arguments: str, stdin: str = "") -> Result:
    """Run `keeper` as a user would, in a thread (it runs its own event loop)."""
    env = {
        "KEEPER_AMQP_URL": store.amqp_url,
        "KEEPER_REDIS_URL": redis_url,
        "KEEPER_STORE_TARGET": store.client._store_target,
        "KEEPER_TIMEOUT_S": "20",
    }
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, app, list(arguments), input=stdin, env=env)


def parsed(result: Result) -> Any:
    """The JSON document on stdout. The store runs in this process, and its log lines
    (unconfigured structlog writes to stdout) land in the captured stdout before it."""
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line[:1] in "[{")
    return json.loads("".join(lines[start:]))


async def register(store: Store, name: str, *, encrypted: bool = False) -> str:
    """A VM registered as policy does, running on the fake host, with two TPM versions."""
    vm_id = store.new_vm()
    spec = VmSpec(vm_id=vm_id, name=name, guest_os="windows-11", encrypt_tpm_state=encrypted)
    await awaited(
        store.redis.hset(
            vm_record_key(vm_id), mapping={"spec": spec.model_dump_json(), "tpm_xml": "<tpm/>"}
        )
    )
    await store.place(vm_id, epoch=1)
    for generation in (1, 2):
        content = pack_tpm_state({MAIN_STATE_FILE_NAME: os.urandom(512)})
        store.host.hold(vm_id, StateKind.TPM, content, FencingToken(epoch=1, generation=generation))
        await store.pull(vm_id)
    return vm_id


async def test_status_and_history_as_json(store: Store, redis_url: str) -> None:
    name = unique("cli-vm")
    vm_id = await register(store, name)

    (status,) = parsed(await keeper(store, redis_url, "vm", "status", name, "--json"))
    assert status["vm_id"] == vm_id
    assert status["host"] == store.host.host_id
    assert status["epoch"] == 1
    assert status["protection"] == "protected"
    assert status["state"]["tpm"]["version"] == 2
    assert 0 <= status["newest_persisted_age_s"] < 120
    assert status["tpm_encrypted"] is False
    encrypted = unique("cli-vm")
    await register(store, encrypted, encrypted=True)
    (status,) = parsed(await keeper(store, redis_url, "vm", "status", encrypted, "--json"))
    assert status["tpm_encrypted"] is True

    table = await keeper(store, redis_url, "vm", "status")
    assert table.exit_code == 0
    assert name in table.stdout

    history = parsed(await keeper(store, redis_url, "vm", "history", vm_id, "--json"))
    (tpm,) = [kind for kind in history["kinds"] if kind["kind"] == "tpm"]
    assert tpm["head_version"] == 2
    assert [v["version"] for v in tpm["versions"]] == [1, 2]


async def test_snapshot_export_and_import(store: Store, redis_url: str, tmp_path: Path) -> None:
    name = unique("cli-vm")
    vm_id = await register(store, name)

    pinned = parsed(
        await keeper(store, redis_url, "vm", "snapshot", name, "--name", "s1", "--json")
    )
    assert pinned["versions"] == {"tpm": 2}
    (listed,) = parsed(await keeper(store, redis_url, "vm", "snapshots", name, "--json"))
    assert listed["snapshot_id"] == "s1"

    refused = await keeper(store, redis_url, "vm", "snapshot-delete", name, "s1")
    assert refused.exit_code == ExitCode.ABORTED
    assert "--yes" in refused.stderr
    deleted = parsed(
        await keeper(store, redis_url, "vm", "snapshot-delete", name, "s1", "--yes", "--json")
    )
    assert deleted["deleted"] is True

    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n", encoding="utf-8")
    bundle = tmp_path / "vm.bundle"
    exported = parsed(
        await keeper(
            store, redis_url, "vm", "export", name, "-o", str(bundle),
            "--passphrase-file", str(passphrase), "--json",
        )
    )  # fmt: skip
    assert exported["bytes"] == bundle.stat().st_size > 0
    assert bundle.stat().st_mode & 0o777 == 0o600

    target = str(uuid.uuid4())
    store.vm_ids.append(target)
    imported = parsed(
        await keeper(
            store, redis_url, "vm", "import", str(bundle), "--vm-id", target,
            "--passphrase-file", str(passphrase), "--json",
        )
    )  # fmt: skip
    assert imported["vm_id"] == target
    again = await keeper(
        store, redis_url, "vm", "import", str(bundle), "--vm-id", target,
        "--passphrase-file", str(passphrase),
    )  # fmt: skip
    assert again.exit_code in (ExitCode.OK, ExitCode.REFUSED)  # a repeat is a no-op or refused
    assert vm_id != target


async def test_errors_a_user_meets(store: Store, redis_url: str) -> None:
    unknown = await keeper(store, redis_url, "vm", "history", str(uuid.uuid4()))
    assert unknown.exit_code == ExitCode.UNKNOWN_VM
    assert "unknown VM" in unknown.stderr

    name = unique("cli-vm")
    await register(store, name)
    env_store = store.client._store_target
    store.client._store_target = "state-store"  # the real store's queue: nobody consumes it
    try:
        nobody = await keeper(store, redis_url, "vm", "history", name)
    finally:
        store.client._store_target = env_store
    assert nobody.exit_code == ExitCode.UNREACHABLE
    assert "no state store is running" in nobody.stderr


async def test_hosts_as_json(store: Store, redis_url: str) -> None:
    host = unique("cli-host")
    record = {
        "capabilities": {
            "swtpm_version": "0.8.0",
            "architectures": ["x86_64"],
            "uefi_firmware": True,
        },
        "last_seen": time.time(),
        "cluster": "default",
        "vms": {str(uuid.uuid4()): 1},
    }
    await awaited(store.redis.hset(hosts_key(), host, json.dumps(record)))
    try:
        found = parsed(await keeper(store, redis_url, "hosts", "--json"))
        (mine,) = [item for item in found if item["host"] == host]
        assert mine["status"] == "alive"
        assert mine["vms"] == 1
        assert mine["capabilities"]["swtpm_version"] == "0.8.0"
    finally:
        await awaited(store.redis.hdel(hosts_key(), host))
        await awaited(store.redis.delete(placement_key(host)))


async def test_delete_state_says_what_is_lost_asks_and_leaves_only_the_placement(
    store: Store, redis_url: str
) -> None:
    name = unique("cli-vm")
    vm_id = await register(store, name)
    await store.client.create_snapshot(vm_id, "before-upgrade")

    running = await keeper(store, redis_url, "vm", "delete-state", name, "--yes")
    assert running.exit_code == ExitCode.REFUSED
    assert "shut it down first" in running.stderr

    await awaited(store.redis.hset(placement_key(vm_id), "host", ""))  # stopped
    unconfirmed = await keeper(store, redis_url, "vm", "delete-state", name)
    assert unconfirmed.exit_code == ExitCode.ABORTED
    assert "TPM: 2 stored versions (v1..v2), newest v2" in unconfirmed.stderr
    assert "snapshots: 1 (before-upgrade)" in unconfirmed.stderr
    assert await store.repository.head_version(vm_id, StateKind.TPM) == 2  # nothing deleted

    deleted = parsed(await keeper(store, redis_url, "vm", "delete-state", name, "--yes", "--json"))
    assert deleted == {
        "vm_id": vm_id,
        "tpm_disabled": False,
        "deleted": {"tpm_versions": 2, "nvram_versions": 0, "snapshots": 1},
    }
    left = {key async for key in store.redis.scan_iter(match=f"keeper:{{{vm_id}}}:*")}
    assert left == {placement_key(vm_id).encode(), vm_record_key(vm_id).encode()}

    again = parsed(await keeper(store, redis_url, "vm", "delete-state", name, "--json"))
    assert again["deleted"] == {"tpm_versions": 0, "nvram_versions": 0, "snapshots": 0}
