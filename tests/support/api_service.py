"""The HTTP API as a real process (``python -m keeper_api``) in front of a PolicyStack:
its own Redis user for operations, tokens for an operator and a reader, and an httpx
client; what the API and console tests share."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from keeper_api.tokens import token_hash
from keeper_devtools.demo.processes import ServiceProcess
from keeper_devtools.localstack.redis_users import API
from support.policy_stack import PolicyStack

OPERATOR_TOKEN = "operator-token-for-tests-0123456789"
READER_TOKEN = "reader-token-for-tests-0123456789"
STARTUP_TIMEOUT_S = 30.0
OPERATION_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ApiService:
    """The running API: its base URL, its process, a client."""

    base_url: str
    process: ServiceProcess
    http: httpx.AsyncClient

    def auth(self, token: str = OPERATOR_TOKEN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def call(
        self, method: str, path: str, *, token: str = OPERATOR_TOKEN, **kwargs: Any
    ) -> httpx.Response:
        return await self.http.request(method, path, headers=self.auth(token), **kwargs)

    async def finished(self, accepted: httpx.Response) -> dict[str, Any]:
        """Poll the operation a 202 named, at this replica (whichever accepted it), until it
        is no longer running; its record."""
        assert accepted.status_code == 202, accepted.text
        location = httpx.URL(accepted.headers["location"]).path
        deadline = time.monotonic() + OPERATION_TIMEOUT_S
        while time.monotonic() < deadline:
            polled = await self.call("GET", location, token=READER_TOKEN)
            assert polled.status_code == 200, polled.text
            record: dict[str, Any] = polled.json()
            if record["status"] != "running":
                return record
            await asyncio.sleep(0.2)
        raise AssertionError(f"operation {location} still running after {OPERATION_TIMEOUT_S} s")


def write_tokens(path: Path) -> Path:
    path.write_text(
        "# test tokens\n"
        f"alice operator {token_hash(OPERATOR_TOKEN)}\n"
        f"bob reader {token_hash(READER_TOKEN)}  # looks only\n",
        encoding="utf-8",
    )
    return path


@contextlib.asynccontextmanager
async def running_api(
    stack: PolicyStack, work_dir: Path, *, ready: bool = True, **env: str
) -> AsyncIterator[ApiService]:
    """Start the API against ``stack`` and wait until it answers ``/health/ready`` (it
    reached RabbitMQ), or only ``/health`` (it serves) when not ``ready``."""
    probe = "/health/ready" if ready else "/health"
    port = free_port()
    process = ServiceProcess(
        "api",
        "keeper_api",
        {
            "KEEPER_API_AMQP_URLS": stack.amqp_url,
            "KEEPER_API_REDIS_URL": stack.service_redis_url(API),
            "KEEPER_API_TOKENS_FILE": str(write_tokens(work_dir / "api-tokens")),
            "KEEPER_API_LISTEN_PORT": str(port),
            "KEEPER_API_TIMEOUT_S": "60",
            "KEEPER_API_STORE_SEALING_KEY": stack.store_sealing_key.to_text(),
            "KEEPER_API_MAX_BODY_BYTES": str(1024 * 1024),
            **env,
        },
        work_dir / "api.log",
    )
    base_url = f"http://127.0.0.1:{port}"
    await process.start()
    async with httpx.AsyncClient(base_url=base_url, timeout=90.0) as http:
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(probe)).status_code == 200:
                        break
                if not process.running or time.monotonic() > deadline:
                    raise AssertionError(
                        f"the API did not come up: {process.log_path.read_text()[-2000:]}"
                    )
                await asyncio.sleep(0.2)
            yield ApiService(base_url, process, http)
        finally:
            await process.stop(grace_s=30)
