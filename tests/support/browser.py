"""Debian's chromium, headless, driven by Selenium through Debian's chromedriver (no
browser download): for the console's tests. Where chromium is missing the tests are
skipped, except under CI=true, where that is a failure (the fresh machine installs it)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def require_chromium() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} missing: deploy/local/install-packages installs them"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def is_gone(error: WebDriverException) -> bool:
    """Whether an error from asking about an element says its page has been replaced.
    Chromium 156 answers a query made while the next page replaces the document with a
    generic "unknown error" from its inspector ("Node with given id does not belong to the
    document") instead of a stale element, depending on when the query lands."""
    if isinstance(error, StaleElementReferenceException):
        return True
    return "does not belong to the document" in (error.msg or "")


def has_left_page(element: WebElement) -> Callable[[webdriver.Chrome], bool]:
    """A wait condition: the page that held `element` has been replaced."""

    def left(_: webdriver.Chrome) -> bool:
        try:
            element.is_enabled()
        except WebDriverException as error:
            if is_gone(error):
                return True
            raise
        return False

    return left


@contextmanager
def headless_chromium(scratch: Path) -> Iterator[webdriver.Chrome]:
    """A headless chromium with a window big enough for the console's tables, its
    temporary files in ``scratch`` (left in /tmp, each run kept a directory of chromium's
    after it quit)."""
    require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root, where chromium's sandbox cannot
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    service = Service(CHROMEDRIVER, env={**os.environ, "TMPDIR": str(scratch)})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
