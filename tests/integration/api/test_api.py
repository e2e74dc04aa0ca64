"""The HTTP API as a process in front of the real services (store, policy, host agents on
simulated hosts; session RabbitMQ and Redis): every ``keeper vm`` operation over HTTP with
the CLI's outcomes, a reader refused on every route that changes something, bad input
answered with problem details, a clean stop on SIGTERM, an operation whose replica is
killed reported interrupted, and a start while RabbitMQ is down (the API serves, answers
503 and waits for it)."""

from __future__ import annotations

import asyncio
import base64
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yarl

from chaos.tcp_proxy import TcpProxy, plain_url_through, upstream_tls_for
from keeper_api.app import create_app
from keeper_shared.keeper_client.outcomes import ExitCode
from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.types import StateKind
from support.api_service import READER_TOKEN, ApiService, running_api
from support.policy_stack import PolicyStack

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="package"),
]

PROBLEM = "application/problem+json"
READY_TIMEOUT_S = 60.0
"""Generous: against hangs only (the API backs off up to 5 s between attempts)."""


def problem(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    """The problem detail ``response`` must be."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["reason"] == reason
    assert body["type"] == f"urn:keeper:problem:{reason}"
    assert "Traceback" not in response.text
    return body


async def test_every_vm_operation_over_http(stack: tuple[PolicyStack, ApiService]) -> None:
    services, api = stack
    host_a, host_b = services.host_id("a"), services.host_id("b")
    vm_id = str(uuid.uuid4())

    enabled = await api.call(
        "POST", "/api/v1/vms", json={"name": "web-01", "guest_os": "windows-11", "vm_id": vm_id}
    )
    assert enabled.status_code == 201, enabled.text
    assert "<tpm" in enabled.json()["tpm_xml"]

    started = await api.finished(
        await api.call("POST", "/api/v1/vms/web-01/start", json={"host": host_a})
    )
    assert started["status"] == "succeeded", started
    assert started["result"]["host"] == host_a
    assert started["requested_by"] == "alice"
    await services.write_tpm_persisted("a", vm_id)
    services.hosts["a"].create_nvram_from_template("web-01")  # what libvirt does at start
    await services.events.wait_for(
        StatePersisted, lambda e: e.vm_id == vm_id and e.kind is StateKind.NVRAM, 45.0
    )

    listed = (await api.call("GET", "/api/v1/vms", token=READER_TOKEN)).json()
    (mine,) = [vm for vm in listed["vms"] if vm["vm_id"] == vm_id]
    assert (mine["host"], mine["protection"]) == (host_a, "protected")
    shown = (await api.call("GET", f"/api/v1/vms/{vm_id}", token=READER_TOKEN)).json()
    assert shown["epoch"] == started["result"]["epoch"]
    hosts = (await api.call("GET", "/api/v1/hosts", token=READER_TOKEN)).json()["hosts"]
    assert {host_a, host_b} <= {item["host"] for item in hosts}

    snap = await api.call("POST", "/api/v1/vms/web-01/snapshots", json={"snapshot_id": "s1"})
    assert snap.status_code == 201, snap.text
    snapshots = (await api.call("GET", "/api/v1/vms/web-01/snapshots")).json()
    assert [item["snapshot_id"] for item in snapshots] == ["s1"]

    memory = await api.call(
        "POST", "/api/v1/vms/web-01/snapshots", json={"snapshot_id": "m1", "memory": True}
    )
    assert memory.status_code == 201, memory.text
    reverted = await api.finished(
        await api.call("POST", "/api/v1/vms/web-01/revert", json={"snapshot_id": "m1"})
    )
    # libvirt's test driver cannot restore a memory image: the revert is carried out as
    # far as it goes and its failure comes back with policy's reason, as the CLI tells it.
    assert reverted["status"] == "failed", reverted
    assert reverted["problem"]["reason"] == "refused"
    assert reverted["problem"]["detail"].startswith("revert to m1: start on ")
    restarted = await api.finished(
        await api.call("POST", "/api/v1/vms/web-01/start", json={"host": host_a})
    )
    assert restarted["status"] == "succeeded", restarted["problem"]
    accepted = await api.call("POST", "/api/v1/vms/web-01/accept-tpm")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["reset_version"] is None
    not_reported = problem(
        await api.call("POST", "/api/v1/vms/ghost-01/adopt", json={}), 409, "refused"
    )
    assert not_reported["exit_code"] == int(ExitCode.REFUSED)
    # The simulated guest's TPM state is random bytes, which no swtpm loads: the store's
    # refusal comes through as it does for `keeper vm ek`.
    ek = problem(await api.call("GET", "/api/v1/vms/web-01/endorsement-key"), 409, "refused")
    assert ek["detail"].startswith("swtpm could not load the newest TPM version")

    # Running: deleting its state is refused as the CLI refuses it.
    refused = await api.call("DELETE", "/api/v1/vms/web-01/state")
    assert problem(refused, 409, "refused")["exit_code"] == int(ExitCode.REFUSED)

    stopped = await api.finished(await api.call("POST", "/api/v1/vms/web-01/shutdown"))
    assert stopped["status"] == "succeeded", stopped
    assert stopped["result"]["retrieved"] is True
    not_running = problem(await api.call("POST", "/api/v1/vms/web-01/poweroff"), 409, "refused")
    assert not_running["detail"] == "web-01 is not running"

    history = (await api.call("GET", "/api/v1/vms/web-01/history")).json()
    tpm = next(kind for kind in history["kinds"] if kind["kind"] == "tpm")
    assert tpm["head_version"] >= 1

    bundle = await api.call("POST", "/api/v1/vms/web-01/export", json={"passphrase": "p" * 12})
    assert bundle.status_code == 200, bundle.text
    assert bundle.headers["content-type"] == "application/octet-stream"
    imported_id = str(uuid.uuid4())
    imported = await api.finished(
        await api.call(
            "POST",
            "/api/v1/vms/import",
            json={
                "bundle_base64": base64.b64encode(bundle.content).decode(),
                "passphrase": "p" * 12,
                "target_vm_id": imported_id,
            },
        )
    )
    assert imported["status"] == "succeeded", imported
    assert imported["result"]["vm_id"] == imported_id

    clone_id = str(uuid.uuid4())
    cloned = await api.finished(
        await api.call(
            "POST", "/api/v1/vms/web-01/clone", json={"target_vm_id": clone_id, "tpm": "fresh"}
        )
    )
    assert cloned["status"] == "succeeded", cloned["problem"]
    assert cloned["result"]["target_vm_id"] == clone_id

    restored = await api.finished(
        await api.call("POST", "/api/v1/vms/web-01/restore", json={"host": host_b, "version": 1})
    )
    assert restored["status"] == "succeeded", restored
    assert restored["result"]["versions"]["tpm"] == 1
    off = await api.finished(await api.call("POST", "/api/v1/vms/web-01/poweroff"))
    assert off["status"] == "succeeded", off

    gone = await api.call("DELETE", "/api/v1/vms/web-01/snapshots/s1")
    assert gone.json()["deleted"] is True

    made = await api.call("POST", "/api/v1/templates", json={"name": "tpl-1", "from_vm": "web-01"})
    assert made.status_code == 201, made.text
    # Other tests' templates may share this Redis: only this one's is asked about.
    assert "tpl-1" in [t["name"] for t in (await api.call("GET", "/api/v1/templates")).json()]
    child_id = str(uuid.uuid4())
    child = await api.call(
        "POST", "/api/v1/templates/tpl-1/vms", json={"name": "web-02", "vm_id": child_id}
    )
    assert child.status_code == 201, child.text
    assert (await api.call("DELETE", "/api/v1/templates/tpl-1")).status_code == 200

    loss = (await api.call("GET", "/api/v1/vms/web-01/loss")).json()
    assert any(line.startswith("TPM:") for line in loss["lost"])
    deleted = await api.call("DELETE", "/api/v1/vms/web-01/state", params={"reason": "test"})
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["deleted"]["tpm_versions"] >= 1
    disabled = await api.call("POST", f"/api/v1/vms/{child_id}/disable-tpm", json={})
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["tpm_disabled"] is True
    problem(await api.call("GET", f"/api/v1/vms/{child_id}"), 404, "unknown-vm")


def mutating_routes() -> list[tuple[str, str]]:
    """Every route of the API that is not a GET, from its OpenAPI document (so a new one is
    covered without editing this list)."""
    found: list[tuple[str, str]] = []
    for path, methods in create_app(None).openapi()["paths"].items():
        concrete = path.replace("{vm}", "web-01").replace("{template}", "tpl-1")
        concrete = concrete.replace("{snapshot_id}", "s1")
        found.extend((method.upper(), concrete) for method in methods if method != "get")
    return found


async def test_a_reader_changes_nothing_and_strangers_see_nothing(
    stack: tuple[PolicyStack, ApiService],
) -> None:
    _, api = stack
    routes = mutating_routes()
    assert len(routes) >= 17, routes
    for method, path in routes:
        body = problem(await api.call(method, path, token=READER_TOKEN, json={}), 403, "forbidden")
        assert "reader" in body["detail"]
        problem(await api.http.request(method, path, json={}), 401, "unauthenticated")
    problem(await api.call("GET", "/api/v1/vms", token="not-a-token"), 401, "unauthenticated")
    assert (await api.http.get("/health")).json() == {"status": "ok"}


async def test_bad_input_gets_a_problem_detail(stack: tuple[PolicyStack, ApiService]) -> None:
    _, api = stack
    malformed = await api.http.post(
        "/api/v1/vms",
        content=b'{"name": "x", ',
        headers={**api.auth(), "content-type": "application/json"},
    )
    assert problem(malformed, 422, "usage")["exit_code"] == int(ExitCode.USAGE)
    unknown = problem(await api.call("GET", f"/api/v1/vms/{uuid.uuid4()}"), 404, "unknown-vm")
    assert unknown["exit_code"] == int(ExitCode.UNKNOWN_VM)
    bad_uuid = await api.call(
        "POST", "/api/v1/vms", json={"name": "x", "guest_os": "windows-11", "vm_id": "nope"}
    )
    assert "vm_id" in problem(bad_uuid, 422, "usage")["detail"]
    bad_clone = await api.call(
        "POST", "/api/v1/vms/x/clone", json={"target_vm_id": "12345", "tpm": "copy"}
    )
    problem(bad_clone, 422, "usage")
    problem(await api.call("GET", "/api/v1/vms/bad%20name!"), 422, "usage")
    problem(await api.call("POST", "/api/v1/vms", json={"name": "x", "extra": 1}), 422, "usage")
    oversized = await api.call("POST", "/api/v1/vms/import", content=b"x" * (1024 * 1024 + 1))
    problem(oversized, 413, "body-too-large")
    problem(await api.call("GET", "/api/v1/nothing-here"), 404, "not-found")
    problem(await api.call("GET", f"/api/v1/operations/{uuid.uuid4()}"), 404, "not-found")


async def test_any_replica_answers_a_poll_and_sigterm_stops_one_cleanly(
    stack: tuple[PolicyStack, ApiService], tmp_path: Path
) -> None:
    services, first = stack
    accepted = await first.call(
        "POST",
        "/api/v1/vms/import",
        json={"bundle_base64": base64.b64encode(b"not a bundle").decode(), "passphrase": "p" * 12},
    )
    async with running_api(services, tmp_path) as second:
        # The operation was accepted by the first replica; the second reports its outcome.
        polled = await second.finished(accepted)
        assert polled["status"] == "failed"
        assert polled["problem"]["reason"] == "refused", polled  # the store refused it
        assert second.process.process is not None
        second.process.process.send_signal(signal.SIGTERM)
        assert await second.process.process.wait() == 0
        log = second.process.log_path.read_text()
        assert "Application shutdown complete." in log
        assert "Traceback" not in log


async def test_an_operation_whose_replica_is_killed_is_reported_interrupted(
    stack: tuple[PolicyStack, ApiService], tmp_path: Path
) -> None:
    services, first = stack
    bundle = {"bundle_base64": base64.b64encode(b"not a bundle").decode(), "passphrase": "p" * 12}
    # A frozen store answers nothing, so the import waits on its reply when the replica dies.
    services.signal("store", signal.SIGSTOP)
    try:
        async with running_api(
            services, tmp_path, KEEPER_API_OPERATION_HEARTBEAT_S="0.2"
        ) as doomed:
            accepted = await doomed.call("POST", "/api/v1/vms/import", json=bundle)
            assert accepted.status_code == 202, accepted.text
            assert doomed.process.process is not None
            doomed.process.process.send_signal(signal.SIGKILL)
            await doomed.process.process.wait()
            # The surviving replica answers: running while the liveness key lasts, then
            # interrupted, with the CLI's time-out reason (the outcome is unknown).
            polled = await first.finished(accepted)
    finally:
        services.signal("store", signal.SIGCONT)
    assert polled["status"] == "interrupted", polled
    assert polled["problem"]["reason"] == "timeout", polled
    assert "may still be carried out" in polled["problem"]["detail"]


async def test_the_api_serves_before_rabbitmq_answers_and_uses_it_once_it_does(
    stack: tuple[PolicyStack, ApiService], tmp_path: Path, rabbitmq_url: str
) -> None:
    services, _ = stack
    broker = yarl.URL(rabbitmq_url)
    assert broker.host is not None
    assert broker.port is not None
    proxy = TcpProxy(broker.host, broker.port, upstream_tls=upstream_tls_for(rabbitmq_url))
    await proxy.start()
    proxy.cut()  # RabbitMQ "down": every connection refused
    try:
        through = plain_url_through(proxy, services.amqp_url)
        async with running_api(
            services, tmp_path, ready=False, KEEPER_API_AMQP_URLS=through
        ) as api:
            problem(await api.http.get("/health/ready"), 503, "unreachable")
            problem(await api.call("GET", "/api/v1/vms"), 503, "unreachable")
            assert api.process.running, "the API exited instead of waiting for RabbitMQ"
            proxy.heal()
            await wait_until_ready(api)
            listed = await api.call("GET", "/api/v1/vms", token=READER_TOKEN)
            assert listed.status_code == 200, listed.text
    finally:
        await proxy.close()


async def wait_until_ready(api: ApiService) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (await api.http.get("/health/ready")).status_code != 200:
        assert time.monotonic() < deadline, "the API did not reach RabbitMQ once it was up"
        await asyncio.sleep(0.2)
