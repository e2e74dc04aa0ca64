"""The HTTP API and web console in the demo: a process beside the other services, as its
own Redis user, with a fresh operator token whose hash goes into its tokens file and whose
value is written (0600) where the operator can paste it into the console's login."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import urllib.request
from pathlib import Path

from keeper_api.tokens import token_hash
from keeper_devtools.demo.processes import ServiceProcess


def console_service(
    *, amqp_url: str, redis_url: str, port: int, store_key: str, work_dir: Path
) -> tuple[ServiceProcess, str, Path]:
    """The API's process (not started), the console's URL and the token's file."""
    token = secrets.token_urlsafe(32)
    tokens_file = work_dir / "api-tokens"
    tokens_file.write_text(f"demo operator {token_hash(token)}\n", encoding="utf-8")
    token_file = work_dir / "console-token"
    descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write(token + "\n")
    process = ServiceProcess(
        "api",
        "keeper_api",
        {
            "KEEPER_API_AMQP_URLS": amqp_url,
            "KEEPER_API_REDIS_URL": redis_url,
            "KEEPER_API_TOKENS_FILE": str(tokens_file),
            "KEEPER_API_LISTEN_PORT": str(port),
            "KEEPER_API_STORE_SEALING_KEY": store_key,
        },
        work_dir / "logs" / "api.log",
    )
    return process, f"http://127.0.0.1:{port}/console", token_file


async def console_answers(console_url: str) -> bool:
    """Whether the API behind ``console_url`` answers its readiness check (it reached
    RabbitMQ)."""
    health = console_url.removesuffix("/console") + "/health/ready"

    def ask() -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as answer:  # noqa: S310 (our own http URL)
            return bool(answer.status == 200)
        return False

    return await asyncio.to_thread(ask)
