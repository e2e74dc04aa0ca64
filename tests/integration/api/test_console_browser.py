"""The web console in a real headless chromium (Debian's, through Selenium) in front of the
API and the real services: the VM list (with a screenshot kept in the test's directory),
a start on a chosen host followed on its self-reloading operation page, a deletion that is
cancelled (nothing deleted) and then confirmed (deleted), and callers who may not: no
token, a wrong one, a reader."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from keeper_shared.messages.state import StatePersisted
from keeper_shared.messages.types import StateKind
from support.api_service import OPERATION_TIMEOUT_S, OPERATOR_TOKEN, READER_TOKEN, ApiService
from support.browser import has_left_page, headless_chromium, is_gone
from support.policy_stack import PolicyStack

pytestmark = [
    pytest.mark.rabbit,
    pytest.mark.redis,
    pytest.mark.libvirt,
    pytest.mark.asyncio(loop_scope="package"),
]

PAGE_TIMEOUT_S = 30.0


@dataclass
class Console:
    services: PolicyStack
    api: ApiService
    vm_id: str


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def console(stack: tuple[PolicyStack, ApiService]) -> Console:
    """A stopped VM with stored TPM and NVRAM state, and the API in front of it."""
    services, api = stack
    spec = await services.new_vm("a")
    await services.write_tpm_persisted("a", spec.vm_id)
    services.hosts["a"].create_nvram_from_template(spec.name)
    await services.events.wait_for(
        StatePersisted, lambda e: e.vm_id == spec.vm_id and e.kind is StateKind.NVRAM, 45.0
    )
    stopped = await api.finished(await api.call("POST", f"/api/v1/vms/{spec.vm_id}/shutdown"))
    assert stopped["status"] == "succeeded", stopped
    return Console(services, api, spec.vm_id)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    with headless_chromium(tmp_path_factory.mktemp("chromium")) as driver:
        yield driver


def click(browser: webdriver.Chrome, element_id: str) -> None:
    """Click a link or button and wait until the browser has left the page (a click
    returns before the navigation it starts has loaded the next one)."""
    element = browser.find_element(By.ID, element_id)
    element.click()
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(has_left_page(element))


def log_in(browser: webdriver.Chrome, console: Console, token: str) -> None:
    browser.delete_all_cookies()
    browser.get(f"{console.api.base_url}/console/login")
    browser.find_element(By.ID, "token").send_keys(token)
    click(browser, "login")


async def stored_tpm_versions(console: Console) -> int:
    history = (await console.api.call("GET", f"/api/v1/vms/{console.vm_id}/history")).json()
    return sum(len(kind["versions"]) for kind in history["kinds"] if kind["kind"] == "tpm")


async def test_the_vm_list_shows_protection_host_epoch_and_age(
    console: Console, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    log_in(browser, console, OPERATOR_TOKEN)
    assert browser.find_element(By.ID, "who").text == "alice (operator)"
    row = browser.find_element(By.CSS_SELECTOR, f'#vms tr[data-vm-id="{console.vm_id}"]')
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == console.vm_id
    assert cells[2] == "protected"
    assert cells[3] == "stopped"
    assert cells[5].endswith("ago")
    screenshot = tmp_path / "console-vm-list.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    browser.get(f"{console.api.base_url}/console/hosts")
    hosts = browser.find_element(By.ID, "hosts").text
    assert console.services.host_id("a") in hosts
    assert "alive" in hosts


def operation_status(browser: webdriver.Chrome) -> str:
    """The status the operation page shows (read again after each of its reloads)."""
    return browser.find_element(By.ID, "operation-status").text


def operation_finished(browser: webdriver.Chrome) -> bool:
    """Whether the operation page shows a final status; a read that lands while the page
    reloads itself is not an answer, and is asked again."""
    try:
        return operation_status(browser) != "running"
    except WebDriverException as error:
        if is_gone(error):
            return False
        raise


async def test_a_start_on_a_chosen_host_is_followed_until_it_succeeded(
    console: Console, browser: webdriver.Chrome
) -> None:
    log_in(browser, console, OPERATOR_TOKEN)
    browser.get(f"{console.api.base_url}/console/vms/{console.vm_id}")
    host_b = console.services.host_id("b")
    Select(browser.find_element(By.ID, "start-host")).select_by_visible_text(host_b)
    click(browser, "start")

    # Nothing but the page's own <meta> refresh reloads it until the operation is done.
    WebDriverWait(browser, OPERATION_TIMEOUT_S).until(operation_finished)
    assert operation_status(browser) == "succeeded", browser.page_source
    click(browser, "back-to-vm")
    assert browser.find_element(By.ID, "vm-host").text == host_b
    assert browser.find_elements(By.ID, "start") == []

    # Stopped again (through the API) for the deletion that follows.
    stopped = await console.api.finished(
        await console.api.call("POST", f"/api/v1/vms/{console.vm_id}/shutdown")
    )
    assert stopped["status"] == "succeeded", stopped


async def test_a_deletion_cancelled_keeps_everything_and_confirmed_deletes(
    console: Console, browser: webdriver.Chrome
) -> None:
    log_in(browser, console, OPERATOR_TOKEN)
    browser.get(f"{console.api.base_url}/console/vms/{console.vm_id}")
    assert browser.find_element(By.ID, "history").text.count("TPM v") >= 1
    before = await stored_tpm_versions(console)
    assert before >= 1

    click(browser, "delete-state")
    lost = browser.find_element(By.ID, "lost").text
    assert "TPM: " in lost
    assert "recovery keys" in lost
    click(browser, "cancel")
    assert browser.find_element(By.ID, "vm-id").text == console.vm_id
    assert await stored_tpm_versions(console) == before

    click(browser, "delete-state")
    click(browser, "confirm")
    assert f'id="vm-id">{console.vm_id}<' in browser.page_source, browser.page_source
    assert browser.find_element(By.ID, "history").text == "Nothing stored yet."
    assert await stored_tpm_versions(console) == 0


async def test_callers_without_rights_are_refused(
    console: Console, browser: webdriver.Chrome
) -> None:
    browser.delete_all_cookies()
    browser.get(f"{console.api.base_url}/console")
    assert browser.current_url.endswith("/console/login")

    log_in(browser, console, f"wrong-{uuid.uuid4()}")
    assert browser.find_element(By.ID, "login-error").text == "That token is not valid."

    # A reader sees the VM but is offered no deletion, and one forced anyway is refused.
    log_in(browser, console, READER_TOKEN)
    browser.get(f"{console.api.base_url}/console/vms/{console.vm_id}")
    assert browser.find_elements(By.ID, "disable-tpm") == []
    browser.get(f"{console.api.base_url}/console/vms/{console.vm_id}/confirm/disable-tpm")
    click(browser, "confirm")
    assert "reader role" in browser.find_element(By.ID, "refusal").text
    shown = await console.api.call("GET", f"/api/v1/vms/{console.vm_id}")
    assert shown.status_code == 200, "the VM is still registered"
