"""One stack (store, policy, two simulated hosts) and one API process for the API's and
the console's tests together: starting them is most of these tests' time."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from keeper_devtools.localstack.redis_users import RedisUsers
from support.api_service import ApiService, running_api
from support.broker import Broker
from support.policy_stack import PolicyStack


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def stack(
    rabbitmq_broker: Broker,
    redis_url: str,
    redis_users: RedisUsers,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[PolicyStack, ApiService]]:
    work = tmp_path_factory.mktemp("api")
    async with (
        PolicyStack(rabbitmq_broker, redis_url, work, redis_users=redis_users) as services,
        running_api(services, work) as api,
    ):
        yield services, api
