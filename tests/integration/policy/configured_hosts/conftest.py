"""One stack for the policy tests that need hosts configured otherwise than by default:
host a adopts every domain it finds (``KEEPER_HOST_ADOPT=all``), host b none
(``KEEPER_HOST_ADOPT=none``), and host c runs a ``swtpm`` that reports an older version
(0.6.0) than the installed one. Each test works on VMs of its own; the adoption tests
restart agents a and b with their modes, the older-swtpm test places on a and c.

A stack costs about 8 s to start and stop on two cores: one for these tests, not one per
configuration.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from keeper_devtools.localstack.redis_users import RedisUsers
from support.broker import Broker
from support.policy_stack import PolicyStack

OLD_SWTPM_VERSION = "0.6.0"

ADOPTION_MODES = {"a": "all", "b": "none"}
"""``KEEPER_HOST_ADOPT`` of the hosts the adoption tests use."""


def old_swtpm_bin(directory: Path) -> Path:
    """A directory holding a ``swtpm`` that reports `OLD_SWTPM_VERSION`, to put first on
    an agent's PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    fake = directory / "swtpm"
    fake.write_text(
        f"#!/bin/sh\necho 'TPM emulator version {OLD_SWTPM_VERSION}, Copyright (c) IBM Corp.'\n"
    )
    fake.chmod(0o755)
    return directory


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def stack(
    rabbitmq_broker: Broker,
    redis_url: str,
    redis_users: RedisUsers,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[PolicyStack]:
    work = tmp_path_factory.mktemp("configured-hosts")
    fake_bin = old_swtpm_bin(work / "old-swtpm-bin")
    async with PolicyStack(
        rabbitmq_broker,
        redis_url,
        work / "stack",
        host_names=("a", "b", "c"),
        redis_users=redis_users,
        agent_env={
            **{name: {"KEEPER_HOST_ADOPT": mode} for name, mode in ADOPTION_MODES.items()},
            "c": {"PATH": f"{fake_bin}:{os.environ['PATH']}"},
        },
    ) as running:
        yield running
