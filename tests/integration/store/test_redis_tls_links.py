"""Redis over TLS with ACL users against the session's server (TLS only, ``default`` off,
the generated users): each service user gets in with the CA, with or without a client
certificate; the wrong CA, a certificate from another CA, a wrong password, no user and
a plain connection are each refused; no password is on a command line or in Redis's log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import yarl
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from keeper_devtools.contract.redis_acl import users
from keeper_devtools.localstack import RedisServer
from keeper_devtools.localstack.redis_users import POLICY, STORE, RedisUsers
from keeper_devtools.tls import TlsFiles
from keeper_shared.redis_access.connection import RedisSettings, connect_redis
from keeper_shared.runtime.startup import REDIS_UNAVAILABLE, wait_for_dependency
from keeper_shared.runtime.tls_failure import (
    CLIENT_REFUSED,
    TlsHandshakeError,
    describe_tls_failure,
)

pytestmark = pytest.mark.redis


@asynccontextmanager
async def _client(url: str) -> AsyncIterator[Redis]:
    # No retries: a refusal is the answer, not a reason to try again.
    client = connect_redis(RedisSettings(redis_url=url), retry=Retry(NoBackoff(), 0))
    try:
        yield client
    finally:
        await client.aclose()


async def _ping(url: str) -> bool:
    async with _client(url) as client:
        return bool(await client.ping())


def _with_client_certificate(url: str, tls: TlsFiles) -> str:
    return str(
        yarl.URL(url).update_query(
            ssl_certfile=str(tls.client_cert), ssl_keyfile=str(tls.client_key)
        )
    )


@pytest.mark.parametrize("user", [STORE, POLICY])
async def test_each_service_user_gets_in_over_tls(
    session_redis: RedisServer, redis_users: RedisUsers, tls_files: TlsFiles, user: str
) -> None:
    url = session_redis.url_for(*redis_users.login(user))
    assert yarl.URL(url).scheme == "rediss"
    assert await _ping(url)
    assert await _ping(_with_client_certificate(url, tls_files))


async def test_a_server_certificate_from_another_ca_is_refused(
    session_redis: RedisServer, foreign_tls_files: TlsFiles
) -> None:
    url = yarl.URL(session_redis.url).update_query(ssl_ca_certs=str(foreign_tls_files.ca))
    with pytest.raises(RedisConnectionError) as refused:
        await _ping(str(url))
    reason = describe_tls_failure(refused.value)
    assert reason is not None
    assert reason.startswith("the server's certificate is not trusted")


async def test_a_client_certificate_from_another_ca_is_refused(
    session_redis: RedisServer, foreign_tls_files: TlsFiles
) -> None:
    with pytest.raises(RedisConnectionError) as refused:
        await _ping(_with_client_certificate(session_redis.url, foreign_tls_files))
    # TLS 1.3: the server's alert may be read, or lost to the reset that follows it.
    assert describe_tls_failure(refused.value) == CLIENT_REFUSED or "reset" in str(refused.value)


async def test_a_wrong_password_and_no_user_are_refused(
    session_redis: RedisServer, redis_users: RedisUsers
) -> None:
    with pytest.raises(AuthenticationError, match="invalid username-password pair"):
        await _ping(session_redis.url_for(STORE, "not-the-password"))
    with pytest.raises(AuthenticationError, match="Authentication required"):
        await _ping(session_redis.url_for(None, None))


async def test_a_plain_connection_is_refused(
    session_redis: RedisServer, redis_users: RedisUsers
) -> None:
    plain = yarl.URL(session_redis.url_for(*redis_users.login(STORE)))
    with pytest.raises(RedisConnectionError):
        await _ping(str(plain.with_scheme("redis").with_query(None)))


async def test_a_service_stops_waiting_at_a_certificate_it_cannot_trust(
    session_redis: RedisServer, redis_users: RedisUsers, foreign_tls_files: TlsFiles
) -> None:
    url = yarl.URL(session_redis.url_for(*redis_users.login(STORE)))
    wrong_ca = str(url.update_query(ssl_ca_certs=str(foreign_tls_files.ca)))
    async with _client(wrong_ca) as client:
        with pytest.raises(TlsHandshakeError, match="TLS with Redis failed: the server's"):
            await wait_for_dependency(
                client.ping, "Redis", asyncio.Event(), retry_on=REDIS_UNAVAILABLE
            )


def test_no_password_is_on_the_command_line_or_in_the_log(
    session_redis: RedisServer, redis_users: RedisUsers
) -> None:
    """Redis rewrites its process title, so what it was started with is checked where it
    is made; its log after the refusals above must not hold a password either."""
    arguments = " ".join(session_redis.launch_arguments())
    assert str(redis_users.acl_file) in arguments
    log = session_redis.log_file.read_text(encoding="utf-8")
    for user in users():
        password = redis_users.password(user.name)
        assert password not in arguments
        assert password not in log
