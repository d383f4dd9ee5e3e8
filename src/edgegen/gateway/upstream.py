"""The relay's HTTP/1.1 client: kept-alive connections to each node, answers parsed by httptools (llhttp,
the parser uvicorn reads the gateway's own clients with).

aiohttp's client, which this replaces on the relay path, built a request object, a header multidict, a
URL, a payload and a timer for every request, and wrote the head and the body apart: about a third of
the gateway's CPU a prediction (docs/benchmarks.md). Here a request is one join and one write; an answer
is its status, its raw header pairs and the bytes llhttp hands over. The gateway's own calls to a node
(health, admin, rollouts) keep aiohttp (nodes.py, background.py): they are few.

    NodePool    one node: idle connections, the most recent first; at most `limit` open, callers wait
                beyond that; a connection idle for IDLE_S is closed rather than reused
    Connection  one socket: one request at a time; the answer it parses is read through it until
                `release()` returns it to the pool (whole, kept alive) or closes it (anything else)

A failure says whether the node saw the request: `NodeUnreached` (refused, timed out connecting, TLS
refused) never reached it and may go to another node; `NodeFailed` (dropped, not HTTP, silent for
`read_timeout_s`) did.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

log = logging.getLogger("edgegen.gateway")
# uvicorn, which every node runs, closes a connection idle for 5 s: the gateway stops reusing one sooner,
# so a request is never written to a socket the node is closing.
IDLE_S = 4.0
HIGH_WATER = 256 * 1024  # bytes of an answer held unread before reading from the node pauses
_BODYLESS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})  # no Content-Length when empty


class NodeUnreached(Exception):
    """The request never reached the node."""


class NodeFailed(Exception):
    """The node was sent the request and did not answer it whole."""


class Connection(asyncio.Protocol):
    """One connection to a node, and the answer being read from it. Between `NodePool.request` and
    `release()` its `status`, `headers` (names lower-cased), `content_length` and `content_type` are that
    answer's."""

    def __init__(self, pool: NodePool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # the read timeout's, kept across requests
        self._last_data = 0.0
        self._reading = False  # a request's answer is awaited: the read timeout counts
        self._asked = False  # a request was sent and its answer has not begun yet
        self._stray = False  # the node sent an answer nobody asked for: this connection is done
        self._start_answer()

    def _start_answer(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.content_type = b""
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._whole = False  # the caller takes the body whole (`read`): no pause, whatever is held
        self._head_only = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are no subclass of asyncio's)
        self.pool.open += 1

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(NodeFailed(f"not an HTTP answer ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.complete:
            self._fail(NodeFailed("ServerDisconnected" if exc is None else type(exc).__name__))
        self.pool.lost(self)

    def pause_writing(self) -> None:
        """A large request body waits in the transport's buffer; nothing else is written meanwhile."""

    def resume_writing(self) -> None:
        """See `pause_writing`."""

    # -- httptools callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        """An answer begins: the one asked for, or one nobody asked for (sent beyond an answer, or to an
        idle connection), which must never become part of an answer — this one's or the next request's.
        The connection is closed; the answer already read whole stays the caller's."""
        if self._asked:
            self._asked = False
            return
        self._stray = True
        log.warning("a node sent an answer nobody asked for", extra={"node_url": self.pool.url})
        if self.transport is not None:
            self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._stray:
            return
        name = name.lower()
        if name == b"content-length":
            self.content_length = int(value)
        elif name == b"content-type":
            self.content_type = value.split(b";", 1)[0].strip().lower()
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._stray:
            return
        self.status = self.parser.get_status_code()
        self.head_done = True
        if self._head_only:  # an answer to HEAD has no body, whatever its Content-Length says
            self.complete, self.keep_alive = True, False
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._head_only or self._stray:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if (
            self._buffered > HIGH_WATER
            and not self._paused
            and not self._whole
            and self.transport is not None
        ):
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._stray:
            return
        self.keep_alive = self.parser.should_keep_alive()  # (llhttp forgets it once the next message starts)
        self.complete = True
        self._reading = False
        self._wake()

    # -- one request ---------------------------------------------------------------------------------
    def send(self, method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], body: bytes) -> None:
        assert self.transport is not None
        self._start_answer()
        self._asked = True
        self._head_only = method == b"HEAD"
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", self.pool.authority, b"\r\n"]
        for name, value in fields:
            parts += (name, b": ", value, b"\r\n")
        if body or method not in _BODYLESS:
            parts.append(b"content-length: %d\r\n" % len(body))
        parts += (b"\r\n", body)
        self.transport.write(b"".join(parts))
        self._last_data = self.loop.time()
        self._reading = True
        if self._timer is None:
            self._timer = self.loop.call_later(self.pool.read_timeout_s, self._check_silence)

    async def head(self) -> None:
        while not self.head_done:
            await self._wait()

    async def read(self) -> bytes:
        """The whole body (of a bounded length: the caller knows it). Reading from the node goes on past
        the high-water mark that pauses a stream (`chunks`), which nothing here would resume."""
        self._whole = True
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        while not self.complete:
            await self._wait()
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= HIGH_WATER // 2 and self.transport is not None:
                    self._paused = False
                    self._last_data = self.loop.time()  # (silence counts from here, not from the pause)
                    self.transport.resume_reading()
                yield chunk
            if self.complete:
                return
            await self._wait()

    def release(self) -> None:
        """Back to the pool when the answer was read whole and the node keeps the connection; closed
        otherwise (how a node learns that nobody waits for the rest: a generation stops there)."""
        self._reading = False
        if self.reusable():
            self.pool.give_back(self)
        else:
            self.close()

    def reusable(self) -> bool:
        return (
            self.transport is not None
            and self.complete
            and self.keep_alive
            and not self._stray
            and self.error is None
            and not self._chunks
        )

    def close(self) -> None:
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    # -- waiting -------------------------------------------------------------------------------------
    async def _wait(self) -> None:
        if self.error is not None:
            raise self.error
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._stop_timer()
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def _check_silence(self) -> None:
        """The read timeout, on one timer for the connection's whole life, not one per request: moved on
        when it fires early (data came since, or a later request was sent), let go when it fires between
        requests (the next one sets it again). A timer made and cancelled per request cost ~4 µs."""
        self._timer = None
        if not self._reading:
            return
        if self._paused:  # the reader is behind, not the node, which may send nothing until it catches up:
            self._last_data = self.loop.time()  # its client's server cuts off a client that stopped reading
        silent = self.loop.time() - self._last_data
        if silent >= self.pool.read_timeout_s:
            self._fail(NodeFailed("TimeoutError"))
        else:
            self._timer = self.loop.call_later(self.pool.read_timeout_s - silent, self._check_silence)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class NodePool:
    """Connections to one node (`url`: `http://host:port` or `https://…` with `ssl_context`)."""

    def __init__(
        self,
        url: str,
        ssl_context: ssl.SSLContext | None,
        limit: int,
        connect_timeout_s: float,
        read_timeout_s: float,
    ) -> None:
        parts = urlsplit(url)
        https = parts.scheme == "https"
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if https else 80)
        self.authority = parts.netloc.encode("ascii")
        self.ssl: ssl.SSLContext | None = (ssl_context or ssl.create_default_context()) if https else None
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.open = 0  # connections made and not yet lost
        self.connecting = 0
        self.closing = False
        self._idle: list[Connection] = []
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()

    async def request(
        self, method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], body: bytes
    ) -> Connection:
        """Send a request; return once the answer's head is in. The connection is the caller's to read
        and `release()`; it is closed here if anything (the caller's cancellation too) ends the wait."""
        connection = await self._acquire()
        try:
            connection.send(method, target, fields, body)
            await connection.head()
        except BaseException:
            connection.close()
            raise
        return connection

    async def _acquire(self) -> Connection:
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()
            if connection.transport is not None and now - connection.idle_since < IDLE_S:
                return connection
            connection.close()
        if self.open + self.connecting >= self.limit:
            waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and (given := waiter.result()) is not None:
                    self.give_back(given)
                elif not waiter.done():
                    self._waiters.remove(waiter)
                raise
            if handed is not None:
                return handed
        self.connecting += 1
        try:
            return await self._connect()
        finally:
            self.connecting -= 1
            if self.open + self.connecting < self.limit:
                self._slot_freed()

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: Connection(self), self.host, self.port, ssl=self.ssl
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise NodeUnreached(type(exc).__name__) from exc
        return connection

    def give_back(self, connection: Connection) -> None:
        if self.closing:
            connection.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.append(connection)

    def lost(self, connection: Connection) -> None:
        """A connection closed (either side): its place goes to a waiting caller."""
        self.open -= 1
        if connection in self._idle:
            self._idle.remove(connection)
        self._slot_freed()

    def _slot_freed(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Idle connections now; the rest as their answers are released."""
        self.closing = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()
