"""A real state-store process serves /metrics, /healthz and /readyz when
KEEPER_METRICS_PORT is set, and releases the port when SIGTERM stops it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from keeper_devtools.localstack import free_tcp_ports
from support.bus_hygiene import purge_service_queues

pytestmark = [pytest.mark.rabbit, pytest.mark.redis]


async def _get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_store_process_serves_health_and_metrics(
    rabbitmq_url: str, redis_url: str, tmp_path: Path, store_sealing_key_file: Path
) -> None:
    kek = tmp_path / "kek"
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    (port,) = free_tcp_ports(1)
    env = {
        **os.environ,
        "KEEPER_STORE_AMQP_URL": rabbitmq_url,
        "KEEPER_STORE_REDIS_URL": redis_url,
        "KEEPER_STORE_KEK_FILE": str(kek),
        "KEEPER_STORE_SEALING_KEY_FILE": str(store_sealing_key_file),
        "KEEPER_STORE_REPLICA_ID": "metrics-test",
        "KEEPER_STORE_SCRUB_ENABLED": "false",
        "KEEPER_METRICS_PORT": str(port),
        "KEEPER_METRICS_HOST": "127.0.0.1",
    }
    # The store consumes the real service queues: start and leave them empty.
    await purge_service_queues(rabbitmq_url)
    log = (tmp_path / "store.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keeper_state_store", env=env, stdout=log, stderr=log
    )
    try:
        ready = None
        async with asyncio.timeout(60):
            while ready != 200:
                await asyncio.sleep(0.2)
                assert process.returncode is None, (tmp_path / "store.log").read_text()
                try:
                    ready, _ = await _get(port, "/readyz")
                except OSError:
                    continue
        assert await _get(port, "/healthz") == (200, "ok\n")
        status, body = await _get(port, "/metrics")
        assert status == 200
        assert "keeper_persist_seconds_bucket" in body
        assert "keeper_ready 1.0" in body
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
        log.close()
        await purge_service_queues(rabbitmq_url)
    assert code == 0
    with pytest.raises(ConnectionRefusedError):
        await _get(port, "/healthz")
