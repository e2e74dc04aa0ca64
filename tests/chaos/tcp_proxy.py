"""A small asyncio TCP proxy that can lose a reply or cut a link on demand.

Placed between a service and a server, it forwards bytes both ways untouched until told:

- `drop_reply_after(marker)`: the next time a request containing ``marker`` goes through
  (e.g. ``EVALSHA``, the store's fenced write), the server's answer is thrown away and
  the connection closed, so the client cannot know whether its write happened and
  retries it: the case that must not apply a write twice.
- `cut()` and `heal()`: every connection is reset and new ones are refused until healed,
  as when a host loses its network (the service keeps running and must reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 64 * 1024


class TcpProxy:
    """Forwards ``listen_host:<port>`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1"):
        self._target = (target_host, target_port)
        self.listen_host = listen_host
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._drop_marker: bytes | None = None
        self._cut = False
        self.replies_dropped = 0
        self.cuts = 0

    @property
    def port(self) -> int:
        """The port the proxy listens on (after start)."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
            self._reset_all()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    def drop_reply_after(self, marker: bytes) -> None:
        """Lose the answer to the next request that contains ``marker`` (once)."""
        self._drop_marker = marker

    @property
    def drop_pending(self) -> bool:
        """True while an armed drop has not happened yet."""
        return self._drop_marker is not None

    def cut(self) -> None:
        """Reset every connection and refuse new ones until `heal`."""
        self._cut = True
        self.cuts += 1
        self._reset_all()

    def heal(self) -> None:
        """Accept connections again."""
        self._cut = False

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Registered before the first await, so that `close` finds and ends every link,
        # and every stream is aborted whichever way the link ends (no unclosed socket).
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        self._writers.add(client_w)
        server_w: asyncio.StreamWriter | None = None
        try:
            if self._cut:
                return
            try:
                server_r, server_w = await asyncio.open_connection(*self._target)
            except OSError:
                return
            self._writers.add(server_w)
            request_marked = asyncio.Event()
            upstream = asyncio.create_task(self._pump(client_r, server_w, request_marked))
            downstream = asyncio.create_task(self._pump_replies(server_r, client_w, request_marked))
            try:
                await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in (upstream, downstream):
                    pump.cancel()
                await asyncio.gather(upstream, downstream, return_exceptions=True)
        finally:
            for writer in (client_w, server_w):
                if writer is not None:
                    writer.transport.abort()
                    self._writers.discard(writer)
            self._links.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, marked: asyncio.Event
    ) -> None:
        """Client to server; notes when a request carries the armed marker."""
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                if self._drop_marker is not None and self._drop_marker in data:
                    self._drop_marker = None
                    marked.set()
                writer.write(data)
                await writer.drain()

    async def _pump_replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, marked: asyncio.Event
    ) -> None:
        """Server to client; after a marked request, swallows the answer and hangs up."""
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                if marked.is_set():
                    self.replies_dropped += 1
                    return  # the caller closes both sides: the reply never arrives
                writer.write(data)
                await writer.drain()
