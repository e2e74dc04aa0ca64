"""One stack (store, one policy replica, two simulated hosts, the default settings) for the
policy tests that neither kill a service for good nor need other settings: starting a
stack is most of such a test's time. Each test works on VMs of its own (new ids), so what
one leaves behind is no other's business; a test that freezes an agent thaws it before it
ends, also when it fails.

Tests that kill a replica or an agent, or need other settings, run on other stacks
(``test_policy_workflows.py``, ``test_policy_host_loss.py``, ``configured_hosts/``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from keeper_devtools.localstack.redis_users import RedisUsers
from support.broker import Broker
from support.policy_stack import PolicyStack


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def stack(
    rabbitmq_broker: Broker,
    redis_url: str,
    redis_users: RedisUsers,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[PolicyStack]:
    async with PolicyStack(
        rabbitmq_broker, redis_url, tmp_path_factory.mktemp("policy"), redis_users=redis_users
    ) as running:
        yield running
