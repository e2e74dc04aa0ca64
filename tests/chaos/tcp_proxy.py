"""A small asyncio TCP proxy that can lose a reply or cut a link on demand.

Placed between a service and a server, it forwards bytes both ways untouched until told:

- `drop_reply_after(marker)`: the next time a request containing ``marker`` goes through
  (e.g. ``EVALSHA``, the store's fenced write), the server's answer is thrown away and
  the connection closed, so the client cannot know whether its write happened and
  retries it: the case that must not apply a write twice.
- `cut()` and `heal()`: every connection is reset and new ones are refused until healed,
  as when a host loses its network (the service keeps running and must reconnect).
- `cut_at_method(name, occurrence)`: for AMQP clients, `cut()` the moment the client
  sends the ``occurrence``-th frame of that method (``"Queue.Bind"``, ``"Basic.Qos"`` ...),
  which is swallowed: the broker node is gone while that declaration is in flight.

Both read the protocol, which TLS hides: against a TLS-only server the proxy is given an
``upstream_tls`` context and speaks TLS to the server, plain to its clients (on loopback,
in the test only), as a TLS-terminating load balancer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from typing import cast

import yarl
from pamqp.base import Frame
from pamqp.commands import INDEX_MAPPING

CHUNK = 64 * 1024
AMQP_PROTOCOL_HEADER_SIZE = 8
AMQP_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size; then payload, end
AMQP_METHOD_FRAME = 1


class AmqpMethodReader:
    """Names the AMQP methods in one client's byte stream, whatever its chunking."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header_skipped = False

    def feed(self, data: bytes) -> list[str]:
        """The methods (``"Queue.Declare"`` ...) of every frame that ``data`` completes."""
        self._buffer += data
        if not self._header_skipped:
            if len(self._buffer) < AMQP_PROTOCOL_HEADER_SIZE:
                return []
            del self._buffer[:AMQP_PROTOCOL_HEADER_SIZE]
            self._header_skipped = True
        names = []
        while len(self._buffer) >= AMQP_FRAME_HEADER.size:
            frame_type, _, size = AMQP_FRAME_HEADER.unpack_from(self._buffer)
            frame_end = AMQP_FRAME_HEADER.size + size + 1
            if len(self._buffer) < frame_end:
                break
            if frame_type == AMQP_METHOD_FRAME:
                (index,) = struct.unpack_from(">I", self._buffer, AMQP_FRAME_HEADER.size)
                # pamqp's map is typed loosely; every value is a method frame class.
                method = cast("type[Frame] | None", INDEX_MAPPING.get(index))
                names.append(method.name if method is not None else f"unknown {index:#010x}")
            del self._buffer[:frame_end]
        return names


TLS_SCHEMES = {"amqps": "amqp", "rediss": "redis"}
CA_QUERY_OPTIONS = ("cafile", "ssl_ca_certs")


def upstream_tls_for(url: str) -> ssl.SSLContext | None:
    """The TLS context a protocol-reading proxy dials the server of ``url`` with (its CA
    from the URL), or None when ``url`` is plain."""
    parsed = yarl.URL(url)
    if parsed.scheme not in TLS_SCHEMES:
        return None
    ca = next((parsed.query[name] for name in CA_QUERY_OPTIONS if name in parsed.query), None)
    return ssl.create_default_context(cafile=ca)


def plain_url_through(proxy: TcpProxy, url: str) -> str:
    """``url`` pointed at a TLS-terminating ``proxy``: its host and port, the plain scheme,
    no TLS options; user, password and database kept."""
    parsed = yarl.URL(url)
    scheme = TLS_SCHEMES.get(parsed.scheme, parsed.scheme)
    moved = parsed.with_scheme(scheme).with_host(proxy.listen_host).with_port(proxy.port)
    return str(moved.with_query(None))


class TcpProxy:
    """Forwards ``listen_host:<port>`` to ``target_host:target_port``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        upstream_tls: ssl.SSLContext | None = None,
    ):
        self._target = (target_host, target_port)
        self.listen_host = listen_host
        self._upstream_tls = upstream_tls
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._drop_marker: bytes | None = None
        self._cut = False
        self._cut_method: str | None = None
        self._method_countdown = 0
        self.replies_dropped = 0
        self.cuts = 0
        self.refused = 0
        """Connections refused while cut: a client that tried again."""

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

    @property
    def connections(self) -> int:
        """How many client connections the proxy holds now."""
        return len(self._links)

    def drop_reply_after(self, marker: bytes) -> None:
        """Lose the answer to the next request that contains ``marker`` (once)."""
        self._drop_marker = marker

    @property
    def drop_pending(self) -> bool:
        """True while an armed drop has not happened yet."""
        return self._drop_marker is not None

    def cut_at_method(self, name: str, occurrence: int = 1) -> None:
        """`cut` when a client sends its ``occurrence``-th ``name`` method frame (counted
        over the connections opened from now on; once). The frame does not reach the
        server."""
        self._cut_method = name
        self._method_countdown = occurrence

    @property
    def cut_pending(self) -> bool:
        """True while an armed `cut_at_method` has not happened yet."""
        return self._cut_method is not None

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
                self.refused += 1
                return
            try:
                server_r, server_w = await asyncio.open_connection(
                    *self._target, ssl=self._upstream_tls
                )
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
        """Client to server; notes when a request carries the armed marker, and cuts at the
        armed AMQP method."""
        # Only a stream read from its first byte can be split into frames.
        methods = AmqpMethodReader() if self._cut_method is not None else None
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                if self._drop_marker is not None and self._drop_marker in data:
                    self._drop_marker = None
                    marked.set()
                if (
                    methods is not None
                    and self._cut_method is not None
                    and self._reaches_cut_method(methods.feed(data))
                ):
                    self._cut_method = None
                    self.cut()
                    return
                writer.write(data)
                await writer.drain()

    def _reaches_cut_method(self, methods: list[str]) -> bool:
        self._method_countdown -= methods.count(self._cut_method or "")
        return self._method_countdown <= 0

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
