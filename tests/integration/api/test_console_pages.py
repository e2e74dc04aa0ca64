"""The console over plain HTTP with its login cookie (the browser tests cover deleting
state): deleting a snapshot and restoring an older version each show what is lost first
and then do it; a reader's form is refused and changes nothing; a VM's everyday actions
(snapshot, shut down, start on a chosen host, power off) each end on an operation page
that says how they went (a refused start with policy's reason), and a reader is refused
each; stored state older than the threshold is highlighted."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from support.api_service import (
    OPERATION_TIMEOUT_S,
    OPERATOR_TOKEN,
    READER_TOKEN,
    ApiService,
    running_api,
)
from support.policy_stack import PolicyStack

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="package"),
]


async def log_in(browser: httpx.AsyncClient, token: str) -> None:
    """Log in as the console's form does; the client keeps the cookie."""
    answer = await browser.post("/console/login", data={"token": token})
    assert answer.status_code == 303, answer.text


async def followed(browser: httpx.AsyncClient, answer: httpx.Response) -> str:
    """Follow a form's redirect to its operation page, reloading it (as its refresh does)
    until the operation no longer runs; the page then."""
    assert answer.status_code == 303, answer.text
    location = answer.headers["location"]
    assert location.startswith("/console/operations/"), location
    deadline = time.monotonic() + OPERATION_TIMEOUT_S
    while time.monotonic() < deadline:
        page = await browser.get(location)
        assert page.status_code == 200, page.text
        status = re.search(r'id="operation-status">(\w+)<', page.text)
        assert status is not None, page.text
        if status.group(1) != "running":
            assert 'http-equiv="refresh"' not in page.text, "a finished page stops reloading"
            return page.text
        assert 'http-equiv="refresh"' in page.text, "a running page reloads itself"
        await asyncio.sleep(0.2)
    raise AssertionError(f"{location} still running after {OPERATION_TIMEOUT_S} s")


def shown_host(page: str) -> str:
    found = re.search(r'id="vm-host">([^<]*)<', page)
    assert found is not None, page
    return found.group(1)


async def test_snapshot_deletion_and_restore_confirm_what_is_lost(
    stack: tuple[PolicyStack, ApiService],
) -> None:
    services, api = stack
    spec = await services.new_vm("a")
    vm_id = spec.vm_id
    await services.write_tpm_persisted("a", vm_id)
    await services.write_tpm_persisted("a", vm_id)
    pinned = await api.call("POST", f"/api/v1/vms/{vm_id}/snapshots", json={"snapshot_id": "k1"})
    assert pinned.status_code == 201, pinned.text
    stopped = await api.finished(await api.call("POST", f"/api/v1/vms/{vm_id}/shutdown"))
    assert stopped["status"] == "succeeded", stopped
    history = (await api.call("GET", f"/api/v1/vms/{vm_id}/history")).json()
    head = next(kind["head_version"] for kind in history["kinds"] if kind["kind"] == "tpm")
    assert head >= 2  # two writes (the final state is the second one again)

    async with httpx.AsyncClient(base_url=api.base_url, timeout=90.0) as reader:
        await log_in(reader, READER_TOKEN)
        refused = await reader.post(
            f"/console/vms/{vm_id}/delete-snapshot", data={"snapshot": "k1"}
        )
        assert refused.status_code == 403
        assert "reader role" in refused.text
    snapshots = (await api.call("GET", f"/api/v1/vms/{vm_id}/snapshots")).json()
    assert [item["snapshot_id"] for item in snapshots] == ["k1"]

    async with httpx.AsyncClient(base_url=api.base_url, timeout=90.0) as operator:
        await log_in(operator, OPERATOR_TOKEN)
        page = await operator.get(
            f"/console/vms/{vm_id}/confirm/delete-snapshot", params={"snapshot": "k1"}
        )
        assert "snapshot k1" in page.text
        assert "cannot be restored afterwards" in page.text
        done = await operator.post(f"/console/vms/{vm_id}/delete-snapshot", data={"snapshot": "k1"})
        assert done.status_code == 303, done.text
        assert (await api.call("GET", f"/api/v1/vms/{vm_id}/snapshots")).json() == []

        page = await operator.get(
            f"/console/vms/{vm_id}/confirm/restore", params={"kind": "tpm", "version": 1}
        )
        assert f"tpm v2..v{head} stop being the newest" in page.text
        host_a = services.host_id("a")
        done = await operator.post(
            f"/console/vms/{vm_id}/restore", data={"kind": "tpm", "version": "1", "host": host_a}
        )
        assert done.status_code == 303, done.text
    shown = (await api.call("GET", f"/api/v1/vms/{vm_id}")).json()
    assert shown["host"] == host_a
    assert await services.placement(vm_id) == (host_a, shown["epoch"])
    off = await api.finished(await api.call("POST", f"/api/v1/vms/{vm_id}/poweroff"))
    assert off["status"] == "succeeded", off


async def test_everyday_actions_go_through_operations_and_refuse_a_reader(
    stack: tuple[PolicyStack, ApiService],
) -> None:
    services, api = stack
    spec = await services.new_vm("a")
    vm_id = spec.vm_id
    await services.write_tpm_persisted("a", vm_id)
    host_b = services.host_id("b")
    placed = await services.placement(vm_id)

    async with httpx.AsyncClient(base_url=api.base_url, timeout=90.0) as reader:
        await log_in(reader, READER_TOKEN)
        page = (await reader.get(f"/console/vms/{vm_id}")).text
        for button in ('id="shutdown"', 'id="poweroff"', 'id="start"', 'id="take-snapshot"'):
            assert button not in page, f"a reader is offered {button}"
        for action, form in (
            ("start", {"host": host_b}),
            ("shutdown", {}),
            ("poweroff", {}),
            ("snapshot", {"snapshot": "r1"}),
        ):
            refused = await reader.post(f"/console/vms/{vm_id}/{action}", data=form)
            assert refused.status_code == 403, (action, refused.text)
            assert "reader role" in refused.text
    assert (await api.call("GET", f"/api/v1/vms/{vm_id}/snapshots")).json() == []
    assert await services.placement(vm_id) == placed

    async with httpx.AsyncClient(base_url=api.base_url, timeout=90.0) as operator:
        await log_in(operator, OPERATOR_TOKEN)
        page = (await operator.get(f"/console/vms/{vm_id}")).text
        assert 'id="snapshot-memory"' in page, "memory is offered while it runs"
        bad = await operator.post(f"/console/vms/{vm_id}/snapshot", data={"snapshot": "../x"})
        assert bad.status_code == 422
        assert "snapshot_id: String should match pattern" in bad.text
        done = await followed(
            operator, await operator.post(f"/console/vms/{vm_id}/snapshot", data={"snapshot": "c1"})
        )
        assert ">succeeded<" in done, done
        page = (await operator.get(f"/console/vms/{vm_id}")).text
        assert "<tr><td>c1</td>" in page

        done = await followed(operator, await operator.post(f"/console/vms/{vm_id}/shutdown"))
        assert ">succeeded<" in done, done
        assert f'href="/console/vms/{vm_id}"' in done
        page = (await operator.get(f"/console/vms/{vm_id}")).text
        assert shown_host(page).startswith("stopped")
        assert 'id="snapshot-memory"' not in page, "no memory to save while stopped"
        assert f"<option>{host_b}</option>" in page
        again = await operator.post(f"/console/vms/{vm_id}/shutdown")
        assert again.status_code == 409
        assert f"{vm_id} is not running" in again.text
        assert "Traceback" not in again.text

        failed = await followed(
            operator,
            await operator.post(f"/console/vms/{vm_id}/start", data={"host": "no-such-host"}),
        )
        assert ">failed<" in failed, failed
        assert "host no-such-host has never sent a heartbeat" in failed
        assert "Traceback" not in failed
        done = await followed(
            operator, await operator.post(f"/console/vms/{vm_id}/start", data={"host": host_b})
        )
        assert ">succeeded<" in done, done
        assert shown_host((await operator.get(f"/console/vms/{vm_id}")).text) == host_b

        confirm = await operator.get(f"/console/vms/{vm_id}/confirm/poweroff")
        assert f"Power off {vm_id}?" in confirm.text
        assert "not written to its disk" in confirm.text
        done = await followed(operator, await operator.post(f"/console/vms/{vm_id}/poweroff"))
        assert ">succeeded<" in done, done
    shown = (await api.call("GET", f"/api/v1/vms/{vm_id}")).json()
    assert shown["host"] is None
    assert shown["last_host"] == host_b


async def test_state_older_than_the_threshold_is_highlighted(
    stack: tuple[PolicyStack, ApiService], tmp_path: Path
) -> None:
    services, api = stack
    vms = (await api.call("GET", "/api/v1/vms")).json()["vms"]
    oldest = max(vms, key=lambda vm: vm["newest_persisted_age_s"] or 0.0)
    assert oldest["newest_persisted_age_s"] is not None
    # A threshold of 0.1 s: by the time a second API is up, the state is older than that.
    async with (
        running_api(services, tmp_path, KEEPER_API_STALE_AFTER_S="0.1") as strict,
        httpx.AsyncClient(base_url=strict.base_url, timeout=90.0) as browser,
    ):
        await log_in(browser, OPERATOR_TOKEN)
        page = (await browser.get("/console")).text
    assert f'<tr class="stale" data-vm-id="{oldest["vm_id"]}">' in page
    # The shared API's threshold is an hour: nothing of this run is stale there.
    async with httpx.AsyncClient(base_url=api.base_url, timeout=90.0) as browser:
        await log_in(browser, OPERATOR_TOKEN)
        assert (
            f'<tr class="" data-vm-id="{oldest["vm_id"]}">' in (await browser.get("/console")).text
        )
