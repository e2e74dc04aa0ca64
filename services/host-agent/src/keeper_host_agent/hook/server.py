"""The agent's hook socket: a Unix socket only root can use (0600, in a 0700 directory),
one request and one reply per connection, each bounded in size and time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from keeper_host_agent.hook.protocol import (
    MAX_REQUEST_BYTES,
    HookProtocolError,
    HookReply,
    HookRequest,
    encode_reply,
    parse_request,
)

log = structlog.get_logger(__name__)

READ_TIMEOUT_S = 10.0
"""The hook writes its request at once; a client slower than this is not the hook."""

Handle = Callable[[HookRequest], Awaitable[HookReply]]


class HookServer:
    """Serves the hook socket at ``path`` with ``handle``."""

    def __init__(self, path: Path, handle: Handle) -> None:
        self._path = path
        self._handle = handle
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Bind the socket (replacing a stale one left by a killed agent)."""
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self._path).st_mode):
                os.unlink(self._path)
        # The umask keeps the socket private from the moment it exists; chmod makes it exact.
        previous = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self._path), limit=MAX_REQUEST_BYTES + 1024
            )
        finally:
            os.umask(previous)
        os.chmod(self._path, 0o600)
        log.info("hook socket listening", path=str(self._path))

    async def close(self) -> None:
        """Stop accepting; the socket file goes with it."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    line = await reader.readline()
                reply = await self._handle(parse_request(line))
            except HookProtocolError as error:
                reply = HookReply(ok=False, message=f"vTPM Keeper: bad hook request: {error}")
            except (TimeoutError, ValueError) as error:
                # ValueError: a line over the limit (asyncio's LimitOverrunError).
                reply = HookReply(
                    ok=False, message=f"vTPM Keeper: unreadable hook request: {error}"
                )
            writer.write(encode_reply(reply))
            await writer.drain()
        except (ConnectionError, OSError) as error:
            log.warning("hook went away before its reply", reason=str(error))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
