"""The demo story end to end against real RabbitMQ, Redis, swtpm and libvirt's test driver,
over TLS, the store and policy each as its own Redis ACL user; then a scan of everything
written for the secret, the TPM bytes (invariant 4) and the Redis passwords."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from keeper_api.auth import CONSOLE_COOKIE
from keeper_devtools.contract.redis_acl import users
from keeper_devtools.demo.story import DemoConfig, run_story
from keeper_devtools.localstack import RedisServer
from keeper_devtools.localstack.redis_users import API, POLICY, STORE, RedisUsers
from keeper_shared.state_format.tpm_archive import MAIN_STATE_FILE_NAME
from support.api_service import free_port
from support.broker import Broker
from support.bus_hygiene import purge_service_queues
from support.leak_scan import content_fingerprints, every_redis_value, find_leaks, leak_forms

pytestmark = [pytest.mark.e2e, pytest.mark.rabbit, pytest.mark.redis, pytest.mark.swtpm]


async def test_secret_sealed_on_host_a_reads_back_on_host_b_and_never_leaks(
    rabbitmq_broker: Broker,
    redis_url: str,
    session_redis: RedisServer,
    redis_users: RedisUsers,
    tmp_path: Path,
) -> None:
    await purge_service_queues(rabbitmq_broker.url)
    out = io.StringIO()
    config = DemoConfig(
        amqp_url=rabbitmq_broker.url,
        broker=rabbitmq_broker,
        redis_url=session_redis.url_for(*redis_users.login(STORE)),
        policy_redis_url=session_redis.url_for(*redis_users.login(POLICY)),
        api_redis_url=session_redis.url_for(*redis_users.login(API)),
        api_port=free_port(),
        work_dir=tmp_path / "demo",
        kek_file=tmp_path / "keys" / "kek.key",
    )

    served: list[int] = []

    async def look_at_the_console(console_url: str) -> None:
        # What a person does with `make console`: the demo's VM is listed, logged in.
        token = (config.work_dir / "console-token").read_text().strip()
        async with httpx.AsyncClient(cookies={CONSOLE_COOKIE: token}) as http:
            listed = await http.get(console_url)
        assert listed.status_code == 200, listed.text
        served.append(listed.text.count("win11-"))

    result = await run_story(config, out, keep_serving=look_at_the_console)

    printed = out.getvalue()
    print(printed)
    assert result.secret_matches
    assert "the secret matches" in printed
    assert f"http://127.0.0.1:{config.api_port}/console while the demo runs" in printed
    assert served == [1], "the console kept serving did not list the demo's VM"
    assert set(result.exit_codes.values()) == {0}, result.exit_codes

    permall = (
        tmp_path / "demo" / "host-b" / "swtpm" / result.vm_id / "tpm2" / MAIN_STATE_FILE_NAME
    ).read_bytes()
    needles = leak_forms(result.secret) + content_fingerprints(permall)
    written = [("demo output", printed.encode())]
    written += [(str(path), path.read_bytes()) for path in result.log_files]
    assert find_leaks(written, needles) == []
    passwords = [redis_users.password(user.name).encode() for user in users()]
    assert find_leaks(written, passwords) == []
    for name, data in written:
        assert b"Traceback" not in data, name

    # Every key in Redis, of every type, not only this VM's: no plaintext anywhere.
    redis = Redis.from_url(redis_url)
    try:
        values = [(key.decode(), value) async for key, value in every_redis_value(redis)]
        assert any(f"{{{result.vm_id}}}" in key for key, _ in values), "nothing stored for the VM"
        assert find_leaks(values, needles) == []
    finally:
        await redis.aclose()
