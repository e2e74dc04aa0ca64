"""Fixtures for the integration tests: swtpm checks, and in-process state stores on the
session's RabbitMQ and Redis."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from keeper_devtools.localstack import RedisServer
from keeper_devtools.swtpm_lab import write_private_ca_config
from keeper_shared.swtpm import missing_tools
from keeper_state_store.crypto.encryption import KeyEncryptionKey
from support.in_process_store import Store, running_store
from support.process_table import swtpm_children


@pytest.fixture(scope="session")
def swtpm_tools() -> None:
    """Skip without swtpm and tpm2-tools, except on CI where that is a broken setup."""
    missing = missing_tools()
    if shutil.which("tpm2_readpublic") is None:
        missing.append("tpm2_readpublic")
    if not missing:
        return
    message = f"missing {', '.join(missing)} (apt-get install swtpm swtpm-tools tpm2-tools)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def no_swtpm_left() -> Iterator[None]:
    """The test must leave no swtpm behind, whether it passed or failed."""
    assert swtpm_children() == [], "an swtpm was running before the test"
    yield
    leftovers = swtpm_children()
    for pid in leftovers:
        # Report the leak, but do not let it outlive the test run.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"swtpm left running: {leftovers}"


@pytest.fixture(scope="session")
def ca_config(tmp_path_factory: pytest.TempPathFactory, swtpm_tools: None) -> Path:
    """A private swtpm_setup config, so tests do not touch /var/lib/swtpm-localca."""
    return write_private_ca_config(tmp_path_factory.mktemp("swtpm-ca"))


@pytest_asyncio.fixture
async def store(rabbitmq_url: str, redis_url: str, kek: KeyEncryptionKey) -> AsyncIterator[Store]:
    """A state store of the test's own (private queues, fake host, the test's KEK)."""
    async with running_store(rabbitmq_url, redis_url, kek) as s:
        yield s


@pytest_asyncio.fixture
async def empty_store(rabbitmq_url: str, private_redis_server: RedisServer) -> AsyncIterator[Store]:
    """A second store: its own, empty Redis and its own KEK."""
    kek = KeyEncryptionKey(os.urandom(32))
    async with running_store(rabbitmq_url, private_redis_server.url, kek) as s:
        yield s
