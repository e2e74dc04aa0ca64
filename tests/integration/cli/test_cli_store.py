"""`keeper` against a real state store and policy's real query handlers (in process, from
support.in_process_store, on the session's RabbitMQ and Redis): status, hosts, history, snapshots,
export and import, with --json parsed as a script would, and the errors a user meets.

The CLI is given no usable Redis address (``KEEPER_REDIS_URL`` names a closed port): what it
shows comes from the services' answers, and is checked against what they hold."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yarl
from typer.testing import CliRunner, Result

from keeper_cli.app import app
from keeper_cli.errors import ExitCode
from keeper_cli.json_documents import FIELDS, schema_id
from keeper_policy.hosts.registry import HostRegistry
from keeper_policy.storage.keys import HOST_STATUS
from keeper_policy.storage.scripts import PolicyScripts
from keeper_shared.messages.host import HostCapabilities, HostHeartbeat, VmInventoryEntry
from keeper_shared.messages.tpm import VmSpec
from keeper_shared.messages.transfer import CloneTpm
from keeper_shared.messages.types import FencingToken, StateKind
from keeper_shared.redis_access.keys import hosts_key, placement_key, vm_record_key
from keeper_shared.redis_access.results import awaited
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME, pack_tpm_state
from keeper_state_store.storage.version_reader import VersionReader
from support.in_process_store import Store, running_policy_queries, unique

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]

LOST_AFTER_S = 30.0
"""The private policy's loss bound: a host silent longer shows as silent."""


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest_asyncio.fixture
async def policy_key(store: Store) -> AsyncIterator[str]:
    """Policy's query handlers (and snapshot deletion, through this store) over the store's
    Redis; their command key."""
    async with running_policy_queries(
        store.amqp_url,
        store.redis,
        lost_after_s=LOST_AFTER_S,
        store_target=store.client._store_target,
    ) as key:
        yield key


async def keeper(store: Store, policy_key: str, *arguments: str, stdin: str = "") -> Result:
    """Run `keeper` as a user would, in a thread (it runs its own event loop), with a Redis
    address it cannot reach: nothing it does may need Redis."""
    env = {
        "KEEPER_AMQP_URL": store.amqp_url,
        "KEEPER_REDIS_URL": f"redis://127.0.0.1:{_closed_port()}/0",
        "KEEPER_STORE_TARGET": store.client._store_target,
        "KEEPER_STORE_SEALING_KEY": store.service.sealing.own.public.to_text(),
        "KEEPER_POLICY_TARGET": policy_key,
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


async def test_status_and_history_as_json(store: Store, policy_key: str) -> None:
    name = unique("cli-vm")
    vm_id = await register(store, name)

    (status,) = parsed(await keeper(store, policy_key, "vm", "status", name, "--json"))
    assert status["vm_id"] == vm_id
    assert status["host"] == store.host.host_id
    assert status["epoch"] == 1
    assert status["protection"] == "protected"
    assert status["state"]["tpm"]["version"] == 2
    assert 0 <= status["newest_persisted_age_s"] < 120
    assert status["tpm_encrypted"] is False
    encrypted = unique("cli-vm")
    await register(store, encrypted, encrypted=True)
    (status,) = parsed(await keeper(store, policy_key, "vm", "status", encrypted, "--json"))
    assert status["tpm_encrypted"] is True

    table = await keeper(store, policy_key, "vm", "status")
    assert table.exit_code == 0
    assert name in table.stdout

    history = parsed(await keeper(store, policy_key, "vm", "history", vm_id, "--json"))
    (tpm,) = [kind for kind in history["kinds"] if kind["kind"] == "tpm"]
    assert tpm["head_version"] == 2
    assert [v["version"] for v in tpm["versions"]] == [1, 2]


async def test_snapshot_export_and_import(store: Store, policy_key: str, tmp_path: Path) -> None:
    name = unique("cli-vm")
    vm_id = await register(store, name)

    pinned = parsed(
        await keeper(store, policy_key, "vm", "snapshot", name, "--name", "s1", "--json")
    )
    assert pinned["versions"] == {"tpm": 2}
    (listed,) = parsed(await keeper(store, policy_key, "vm", "snapshots", name, "--json"))
    assert listed["snapshot_id"] == "s1"

    refused = await keeper(store, policy_key, "vm", "snapshot-delete", name, "s1")
    assert refused.exit_code == ExitCode.ABORTED
    assert "--yes" in refused.stderr
    deleted = parsed(
        await keeper(store, policy_key, "vm", "snapshot-delete", name, "s1", "--yes", "--json")
    )
    assert deleted["deleted"] is True

    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n", encoding="utf-8")
    bundle = tmp_path / "vm.bundle"
    exported = parsed(
        await keeper(
            store, policy_key, "vm", "export", name, "-o", str(bundle),
            "--passphrase-file", str(passphrase), "--json",
        )
    )  # fmt: skip
    assert exported["bytes"] == bundle.stat().st_size > 0
    assert bundle.stat().st_mode & 0o777 == 0o600

    target = str(uuid.uuid4())
    store.vm_ids.append(target)
    imported = parsed(
        await keeper(
            store, policy_key, "vm", "import", str(bundle), "--vm-id", target,
            "--passphrase-file", str(passphrase), "--json",
        )
    )  # fmt: skip
    assert imported["vm_id"] == target
    again = await keeper(
        store, policy_key, "vm", "import", str(bundle), "--vm-id", target,
        "--passphrase-file", str(passphrase),
    )  # fmt: skip
    assert again.exit_code in (ExitCode.OK, ExitCode.REFUSED)  # a repeat is a no-op or refused
    assert vm_id != target


async def test_errors_a_user_meets(store: Store, policy_key: str) -> None:
    unknown = await keeper(store, policy_key, "vm", "history", str(uuid.uuid4()))
    assert unknown.exit_code == ExitCode.UNKNOWN_VM
    assert "unknown VM" in unknown.stderr

    name = unique("cli-vm")
    await register(store, name)
    env_store = store.client._store_target
    store.client._store_target = "state-store"  # the real store's queue: nobody consumes it
    try:
        nobody = await keeper(store, policy_key, "vm", "history", name)
    finally:
        store.client._store_target = env_store
    assert nobody.exit_code == ExitCode.UNREACHABLE
    assert "no state store is running" in nobody.stderr


async def heartbeat(store: Store, host: str, at: float, vms: int = 1) -> HostRegistry:
    """Record a heartbeat from ``host`` at ``at`` as policy does; the registry that did."""
    hosts = HostRegistry(store.redis, PolicyScripts(store.redis))
    beat = HostHeartbeat(
        host=host,
        interval_s=5.0,
        capabilities=HostCapabilities(
            swtpm_version="0.8.0",
            libvirt_version="10.0.0",
            architectures=["x86_64"],
            uefi_firmware=True,
        ),
        vms=[
            VmInventoryEntry(vm_id=str(uuid.uuid4()), epoch=1, tpm_hash=None, nvram_hash=None)
            for _ in range(vms)
        ],
    )
    await hosts.note_heartbeat(beat, at)
    return hosts


async def forget_hosts(store: Store, *hosts: str) -> None:
    await awaited(store.redis.hdel(hosts_key(), *hosts))
    await awaited(store.redis.hdel(HOST_STATUS, *hosts))


async def test_hosts_as_json(store: Store, policy_key: str) -> None:
    host = unique("cli-host")
    await heartbeat(store, host, time.time())
    try:
        found = parsed(await keeper(store, policy_key, "hosts", "--json"))
        (mine,) = [item for item in found if item["host"] == host]
        assert mine["status"] == "alive"
        assert mine["vms"] == 1
        assert mine["capabilities"]["swtpm_version"] == "0.8.0"
    finally:
        await forget_hosts(store, host)


async def test_hosts_show_policys_liveness(store: Store, policy_key: str) -> None:
    """Silent past policy's bound, lost once declared: the rule is policy's, the CLI only
    shows it (table and JSON)."""
    alive, silent, lost = unique("alive"), unique("silent"), unique("lost")
    now = time.time()
    await heartbeat(store, alive, now, vms=2)
    await heartbeat(store, silent, now - LOST_AFTER_S - 10)
    hosts = await heartbeat(store, lost, now - LOST_AFTER_S - 60)
    assert await hosts.declare_lost(lost, now, LOST_AFTER_S) is not None
    try:
        found = {
            item["host"]: item
            for item in parsed(await keeper(store, policy_key, "hosts", "--json"))
        }
        assert (found[alive]["status"], found[alive]["vms"]) == ("alive", 2)
        assert found[silent]["status"] == "silent"
        assert found[silent]["last_seen_age_s"] >= LOST_AFTER_S + 10
        assert found[lost]["status"] == "lost"
        assert found[lost]["cluster"] == "default"
        assert set(found[lost]["capabilities"]) == set(HostCapabilities.model_fields)

        table = await keeper(store, policy_key, "hosts")
        assert table.exit_code == 0, table.output
        rows = {line.split()[1]: line for line in table.stdout.splitlines() if "│" in line}
        assert "silent" in rows[silent]
        assert "lost" in rows[lost]
    finally:
        await forget_hosts(store, alive, silent, lost)


async def test_status_shows_what_policy_and_the_store_hold(store: Store, policy_key: str) -> None:
    name = unique("cli-vm")
    vm_id = await register(store, name)
    await awaited(store.redis.hset(vm_record_key(vm_id), "last_host", store.host.host_id))

    (status,) = parsed(await keeper(store, policy_key, "vm", "status", vm_id, "--json"))
    head = await store.repository.head_version(vm_id, StateKind.TPM)
    assert head is not None
    newest = await VersionReader(store.repository.redis, store.repository.keys).fetch(
        vm_id, StateKind.TPM, head
    )
    assert newest is not None
    meta = newest.record()
    assert meta is not None
    assert status["name"] == name
    assert status["guest_os"] == "windows-11"
    assert status["running"] is True
    assert status["last_host"] == store.host.host_id
    assert status["state"]["tpm"]["version"] == head
    assert status["state"]["tpm"]["size"] == meta.size
    assert status["state"]["tpm"]["persisted_at"] == meta.stored_at.astimezone().isoformat(
        timespec="seconds"
    )
    assert status["state"]["nvram"] == {
        "version": None,
        "persisted_at": None,
        "age_s": None,
        "size": None,
    }

    everything = parsed(await keeper(store, policy_key, "vm", "status", "--json"))
    assert [item["vm_id"] for item in everything if item["name"] == name] == [vm_id]
    names = [item["name"] or "" for item in everything]
    assert names == sorted(names)  # by name, as policy lists them


async def test_names_resolve_through_policy_and_the_store(store: Store, policy_key: str) -> None:
    name = unique("cli-vm")
    vm_id = await register(store, name)

    history = parsed(await keeper(store, policy_key, "vm", "history", name, "--json"))
    assert history["vm_id"] == vm_id

    # A clone is not registered; its id still names it (the store holds its state).
    clone_id = store.new_vm()
    await store.client.clone_vm(vm_id, clone_id, CloneTpm.COPY)
    history = parsed(await keeper(store, policy_key, "vm", "history", clone_id, "--json"))
    assert history["vm_id"] == clone_id
    assert parsed(await keeper(store, policy_key, "vm", "status", clone_id, "--json")) == []

    twin = await register(store, name)
    ambiguous = await keeper(store, policy_key, "vm", "history", name)
    assert ambiguous.exit_code == ExitCode.USAGE
    assert vm_id in ambiguous.stderr
    assert twin in ambiguous.stderr

    for unknown in (str(uuid.uuid4()), unique("nobody")):
        result = await keeper(store, policy_key, "vm", "status", unknown)
        assert result.exit_code == ExitCode.UNKNOWN_VM, result.output
    # Not a name at all: refused before anything is asked.
    malformed = await keeper(store, policy_key, "vm", "status", "not a name!")
    assert malformed.exit_code == ExitCode.USAGE, malformed.output


async def test_list_and_show_print_documented_json(store: Store, policy_key: str) -> None:
    """`vm list` prints `keeper.vm` documents with exactly the documented fields, `vm show`
    one of them; a table column is its JSON field's name."""
    name = unique("cli-vm")
    vm_id = await register(store, name)

    listed = parsed(await keeper(store, policy_key, "vm", "list", "--json"))
    (mine,) = [item for item in listed if item["vm_id"] == vm_id]
    assert mine["schema"] == schema_id("vm")
    assert tuple(mine)[1:] == FIELDS["vm"]
    assert all(item["schema"] in (schema_id("vm"), schema_id("unprotected-vm")) for item in listed)

    shown = parsed(await keeper(store, policy_key, "vm", "show", name, "--json"))
    assert shown == mine | {
        "newest_persisted_age_s": shown["newest_persisted_age_s"],
        "state": shown["state"],
    }
    table = await keeper(store, policy_key, "vm", "show", name)
    assert table.exit_code == 0, table.output
    assert "vm id:" in table.stdout
    assert vm_id in table.stdout
    assert "VM ID" in (await keeper(store, policy_key, "vm", "list")).stdout

    history = parsed(await keeper(store, policy_key, "vm", "history", name, "--json"))
    assert tuple(history) == ("schema", *FIELDS["state-history"])


async def test_errors_with_json_are_json_on_stderr(store: Store, policy_key: str) -> None:
    unknown = str(uuid.uuid4())
    result = await keeper(store, policy_key, "vm", "show", unknown, "--json")
    assert result.exit_code == ExitCode.UNKNOWN_VM
    # Nothing for a script on stdout (the in-process store's own log lines may be there).
    assert not any(line.startswith(("{", "[")) for line in result.stdout.splitlines())
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("{")]
    error = json.loads(line)
    assert error["schema"] == schema_id("error")
    assert (error["error"], error["exit_code"]) == ("unknown-vm", ExitCode.UNKNOWN_VM)
    assert unknown in error["message"]


async def test_a_missing_policy_is_named(store: Store) -> None:
    """Without policy nothing can be resolved or listed: exit 4, naming what is missing."""
    name = unique("cli-vm")
    await register(store, name)
    runner = CliRunner()
    env = {
        "KEEPER_AMQP_URL": store.amqp_url,
        "KEEPER_STORE_TARGET": store.client._store_target,
        "KEEPER_STORE_SEALING_KEY": store.service.sealing.own.public.to_text(),
        "KEEPER_POLICY_TARGET": "policy",  # the real policy's queue: nobody consumes it here
        "KEEPER_TIMEOUT_S": "20",
    }
    for arguments in (["vm", "status"], ["hosts"], ["vm", "history", name]):
        result = await asyncio.to_thread(runner.invoke, app, arguments, env=env)
        assert result.exit_code == ExitCode.UNREACHABLE, result.output
        assert "no policy service is running" in result.stderr


async def test_delete_state_says_what_is_lost_asks_and_leaves_only_the_placement(
    store: Store, policy_key: str
) -> None:
    name = unique("cli-vm")
    vm_id = await register(store, name)
    await store.client.create_snapshot(vm_id, "before-upgrade")

    running = await keeper(store, policy_key, "vm", "delete-state", name, "--yes")
    assert running.exit_code == ExitCode.REFUSED
    assert "shut it down first" in running.stderr

    await awaited(store.redis.hset(placement_key(vm_id), "host", ""))  # stopped
    unconfirmed = await keeper(store, policy_key, "vm", "delete-state", name)
    assert unconfirmed.exit_code == ExitCode.ABORTED
    assert "TPM: 2 stored versions (v1..v2), newest v2" in unconfirmed.stderr
    assert "snapshots: 1 (before-upgrade)" in unconfirmed.stderr
    assert await store.repository.head_version(vm_id, StateKind.TPM) == 2  # nothing deleted

    deleted = parsed(await keeper(store, policy_key, "vm", "delete-state", name, "--yes", "--json"))
    assert deleted == {
        "schema": "keeper.state-deletion/v2",
        "vm_id": vm_id,
        "tpm_disabled": False,
        "deleted": {"tpm_versions": 2, "nvram_versions": 0, "snapshots": 1},
    }
    left = {key async for key in store.redis.scan_iter(match=f"keeper:{{{vm_id}}}:*")}
    assert left == {placement_key(vm_id).encode(), vm_record_key(vm_id).encode()}

    again = parsed(await keeper(store, policy_key, "vm", "delete-state", name, "--json"))
    assert again["deleted"] == {"tpm_versions": 0, "nvram_versions": 0, "snapshots": 0}


async def test_stopping_a_vm_that_runs_nowhere_says_not_running(
    store: Store, policy_key: str
) -> None:
    name = unique("cli-vm")
    vm_id = await register(store, name)
    await awaited(store.redis.hset(placement_key(vm_id), "host", ""))  # stopped

    for command in ("shutdown", "poweroff"):
        alone = await keeper(store, policy_key, "vm", command, name)
        assert alone.exit_code == ExitCode.REFUSED, alone.output
        assert f"{name} is not running" in alone.stderr

    other = await register(store, unique("cli-vm"))
    await awaited(store.redis.hset(placement_key(other), "host", ""))
    both = await keeper(store, policy_key, "vm", "shutdown", vm_id, other, "--json")
    assert both.exit_code == ExitCode.REFUSED
    documents = json.loads(both.stdout[both.stdout.index("[") :])
    assert [(d["vm_id"], d["stopped"], d["error"]) for d in documents] == [
        (vm_id, False, f"{vm_id} is not running"),
        (other, False, f"{other} is not running"),
    ]


async def test_restore_asks_first_and_refuses_a_running_vm(store: Store, policy_key: str) -> None:
    """As the README says: a restore asks before it starts anything, saying what stops
    being the newest (or that nothing newer is stored), and a running VM is refused."""
    name = unique("cli-vm")
    vm_id = await register(store, name)
    await store.client.create_snapshot(vm_id, "newest")
    host = store.host.host_id

    running = await keeper(
        store, policy_key, "vm", "restore", name, "--host", host, "--version", "1"
    )
    assert running.exit_code == ExitCode.REFUSED
    assert "shut it down first" in running.stderr

    await awaited(store.redis.hset(placement_key(vm_id), "host", ""))  # stopped
    older = await keeper(store, policy_key, "vm", "restore", name, "--host", host, "--version", "1")
    assert older.exit_code == ExitCode.ABORTED, older.output
    assert "tpm v2..v2" in older.stderr
    assert "--yes" in older.stderr
    same = await keeper(
        store, policy_key, "vm", "restore", name, "--host", host, "--snapshot", "newest"
    )
    assert same.exit_code == ExitCode.ABORTED, same.output
    assert "nothing newer is stored" in same.stderr
    assert await store.repository.head_version(vm_id, StateKind.TPM) == 2  # nothing changed


async def test_revert_asks_first_saying_a_running_vm_is_powered_off(
    store: Store, policy_key: str
) -> None:
    """A revert names a snapshot the store holds, and asks before anything changes: a
    running VM is powered off and what its guest did since is left behind. A snapshot
    with memory without a running VM is refused before anything is sent."""
    name = unique("cli-vm")
    vm_id = await register(store, name)
    await store.client.create_snapshot(vm_id, "before-update")

    unknown = await keeper(store, policy_key, "vm", "revert", name, "no-such", "--yes")
    assert unknown.exit_code == ExitCode.REFUSED, unknown.output
    assert "has no snapshot 'no-such'" in unknown.stderr
    unconfirmed = await keeper(store, policy_key, "vm", "revert", name, "before-update")
    assert unconfirmed.exit_code == ExitCode.ABORTED, unconfirmed.output
    assert "it is powered off at once" in unconfirmed.stderr
    assert "--yes" in unconfirmed.stderr

    await awaited(store.redis.hset(placement_key(vm_id), "host", ""))  # stopped
    stopped = await keeper(store, policy_key, "vm", "revert", name, "before-update")
    assert stopped.exit_code == ExitCode.ABORTED, stopped.output
    assert "powered off" not in stopped.stderr
    memory = await keeper(store, policy_key, "vm", "snapshot", name, "--name", "m", "--memory")
    assert memory.exit_code == ExitCode.REFUSED, memory.output
    assert "not running: there is no memory to snapshot" in memory.stderr
    assert [s.snapshot_id for s in await store.client.list_snapshots(vm_id)] == ["before-update"]


async def test_a_refused_login_is_told_as_such(store: Store) -> None:
    """A wrong password is not "cannot reach RabbitMQ": exit 7, naming the user, never
    the password."""
    url = yarl.URL(store.amqp_url)
    user = url.user
    wrong = str(url.with_password("not-the-password"))
    runner = CliRunner()
    result = await asyncio.to_thread(
        runner.invoke, app, ["--amqp-url", wrong, "vm", "list"], env={"KEEPER_AMQP_URLS": ""}
    )
    assert result.exit_code == ExitCode.DENIED, result.output
    assert f"refused the login of user {user!r}" in result.stderr
    assert "not-the-password" not in result.output
