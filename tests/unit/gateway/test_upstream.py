"""The relay's HTTP/1.1 client (gateway/upstream.py) against a scripted HTTP server on loopback: what it
writes, what it reads back, when it reuses a connection and when it must not, and how each failure is told
(never reached, or reached and failed)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from edgegen.gateway import upstream
from edgegen.gateway.upstream import NodeFailed, NodePool, NodeUnreached

Reply = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[bool]]  # (head, body, out) -> keep open


class Scripted:
    """A server that reads each request whole and answers it with `reply`; counts connections."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self.pools: list[NodePool] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.reply(head, body, writer):
                    break
        writer.close()


@contextlib.asynccontextmanager
async def serving(reply: Reply) -> AsyncIterator[Scripted]:
    scripted = Scripted(reply)
    server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
    scripted.port = server.sockets[0].getsockname()[1]
    async with server:
        try:
            yield scripted
        finally:
            for pool in scripted.pools:
                pool.close()
            for writer in scripted.writers:
                writer.close()
            await asyncio.sleep(0.01)  # (the transports' closing callbacks)


def pool_for(server: Scripted, limit: int = 8, read_timeout_s: float = 5.0) -> NodePool:
    pool = NodePool(f"http://127.0.0.1:{server.port}", None, limit, 1.0, read_timeout_s)
    server.pools.append(pool)
    return pool


async def echo(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
    answer = b'{"echo":"' + body + b'"}'
    out.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(answer))
    out.write(b"x-node: a\r\n\r\n" + answer)
    return True


async def test_a_request_is_one_write_with_the_nodes_host_and_its_answer_comes_back_whole() -> None:
    async with serving(echo) as server:
        pool = pool_for(server)
        answer = await pool.request(b"POST", b"/predict?x=1", [(b"x-request-id", b"r1")], b"abc")
        assert (answer.status, answer.content_length, answer.content_type) == (200, 14, b"application/json")
        assert (b"x-node", b"a") in answer.headers
        assert await answer.read() == b'{"echo":"abc"}'
        answer.release()
        assert server.requests == [
            b"POST /predict?x=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nx-request-id: r1\r\n"
            b"content-length: 3\r\n\r\nabc" % server.port
        ]


async def test_a_connection_read_whole_is_reused_and_many_callers_share_the_pool() -> None:
    async with serving(echo) as server:
        pool = pool_for(server, limit=3)

        async def one(i: int) -> bytes:
            answer = await pool.request(b"POST", b"/p", [], b"%d" % i)
            body = await answer.read()
            answer.release()
            return body

        for i in range(5):
            assert await one(i) == b'{"echo":"%d"}' % i
        assert server.connections == 1
        bodies = await asyncio.gather(*(one(i) for i in range(40)))
        assert bodies == [b'{"echo":"%d"}' % i for i in range(40)]  # each caller its own answer
        assert server.connections <= 3
        assert pool.open <= 3


@pytest.mark.parametrize("size", [upstream.HIGH_WATER - 1, upstream.HIGH_WATER * 2, upstream.HIGH_WATER * 4])
async def test_an_answer_read_whole_comes_whole_past_the_mark_that_pauses_a_stream(size: int) -> None:
    """An answer of known length that the proxy reads whole (up to 1 MiB: a batch prediction, a job with
    its answer) in one write of the node's: past the 256 KiB at which reading pauses for a stream, it
    comes whole at once. Before, reading paused there and nothing resumed it: the try timed out (after
    5 minutes by default) as a node failure, and the node was ejected."""
    answer_body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async def big(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        out.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + answer_body)
        return True

    async with serving(big) as server:
        pool = pool_for(server, read_timeout_s=5.0)
        for _ in range(2):  # and the connection, read to its end, serves the next request
            answer = await pool.request(b"POST", b"/predict", [], b"{}")
            assert await asyncio.wait_for(answer.read(), 4) == answer_body
            answer.release()
        assert server.connections == 1


async def test_a_reader_that_falls_behind_a_stream_is_not_the_nodes_silence() -> None:
    """A stream whose reader (the gateway's client) takes nothing for longer than the read timeout:
    reading from the node paused, so the node could send nothing, and that silence is not the node's.
    The stream resumes when the reader does, whole. Before, the try failed as a node failure, three of
    which in a row eject the node: a client could eject healthy nodes by not reading."""
    size = upstream.HIGH_WATER * 8

    async def big_stream(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        out.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(8):
            out.write(b"y" * upstream.HIGH_WATER)
            await out.drain()
        return True

    async with serving(big_stream) as server:
        pool = pool_for(server, read_timeout_s=0.3)
        answer = await pool.request(b"GET", b"/v2/models/m/big", [], b"")
        got = 0
        async for chunk in answer.chunks():
            if not got:
                await asyncio.sleep(1.0)  # the client stopped reading, three read timeouts long
            got += len(chunk)
        assert got == size
        answer.release()


async def test_a_get_carries_no_content_length_and_a_head_answer_has_no_body() -> None:
    async with serving(echo) as server:
        pool = pool_for(server)
        answer = await pool.request(b"GET", b"/v1/models", [], b"")
        await answer.read()
        answer.release()
        head = await pool.request(b"HEAD", b"/v1/models", [], b"")
        assert head.content_length == 11  # the length a GET would have
        assert await head.read() == b""
        head.release()  # never reused: the parser cannot know that no body follows
        assert b"content-length" not in server.requests[0]


async def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    async def stream(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        out.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(3):
            event = b"data: %d\n\n" % i
            out.write(b"%x\r\n%s\r\n" % (len(event), event))
            await out.drain()
            await asyncio.sleep(0.01)
        out.write(b"0\r\n\r\n")
        return True

    async with serving(stream) as server:
        pool = pool_for(server)
        answer = await pool.request(b"POST", b"/v1/chat/completions", [], b"{}")
        assert answer.content_type == b"text/event-stream"
        chunks = [chunk async for chunk in answer.chunks()]
        assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        answer.release()
        cut = await pool.request(b"POST", b"/v1/chat/completions", [], b"{}")
        assert server.connections == 1  # the stream read whole was reused
        async for _ in cut.chunks():
            break
        cut.release()  # left mid-stream: closed, so the node stops generating
        again = await pool.request(b"POST", b"/v1/chat/completions", [], b"{}")
        await again.read()
        again.release()
        assert server.connections == 2


async def test_a_connection_idle_too_long_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "IDLE_S", 0.05)
    async with serving(echo) as server:
        pool = pool_for(server)
        for _ in range(2):
            answer = await pool.request(b"POST", b"/p", [], b"")
            await answer.read()
            answer.release()
            await asyncio.sleep(0.1)
        assert server.connections == 2


async def test_a_closed_port_is_unreached_and_a_dropped_answer_failed() -> None:
    async with serving(echo) as server:
        port = server.port
    with pytest.raises(NodeUnreached):
        await NodePool(f"http://127.0.0.1:{port}", None, 4, 1.0, 5.0).request(b"POST", b"/p", [], b"")

    async def hang_up(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        out.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
        return False

    async with serving(hang_up) as server:
        answer = await pool_for(server).request(b"POST", b"/p", [], b"")
        with pytest.raises(NodeFailed):
            await answer.read()
        answer.release()

    async def garbage(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        out.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        return True

    async with serving(garbage) as server:
        with pytest.raises(NodeFailed, match="not an HTTP answer"):
            await pool_for(server).request(b"POST", b"/p", [], b"")


async def test_a_silent_node_times_out_and_its_connection_is_closed() -> None:
    async def silent(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async with serving(silent) as server:
        pool = pool_for(server, read_timeout_s=0.1)
        with pytest.raises(NodeFailed, match="TimeoutError"):
            await pool.request(b"POST", b"/p", [], b"")
        await asyncio.sleep(0.05)
        assert pool.open == 0


async def test_a_caller_cancelled_while_waiting_for_a_connection_takes_none() -> None:
    gate = asyncio.Event()

    async def held(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        await gate.wait()
        return await echo(head, body, out)

    async with serving(held) as server:
        pool = pool_for(server, limit=1)
        first = asyncio.ensure_future(pool.request(b"POST", b"/p", [], b"1"))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(pool.request(b"POST", b"/p", [], b"2"))
        await asyncio.sleep(0.05)
        waiting.cancel()
        gate.set()
        answer = await first
        assert await answer.read() == b'{"echo":"1"}'
        answer.release()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        answer = await pool.request(b"POST", b"/p", [], b"3")  # it went back, not to the cancelled
        assert await answer.read() == b'{"echo":"3"}'
        answer.release()
        assert server.connections == 1


async def test_a_kept_alive_connection_keeps_one_read_timer_and_it_still_fires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read timeout is a deadline on the connection's one timer, not a timer made per request: many
    requests make one; a node gone silent on a later request still times out."""
    answered = 0

    async def then_silent(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        nonlocal answered
        if answered == 3:
            await asyncio.sleep(5)
            return False
        answered += 1
        return await echo(head, body, out)

    loop = asyncio.get_running_loop()
    timers = 0
    call_later = loop.call_later

    def counted(*args: Any) -> asyncio.TimerHandle:
        nonlocal timers
        timers += 1
        return call_later(*args)

    async with serving(then_silent) as server:
        pool = pool_for(server, read_timeout_s=0.3)
        monkeypatch.setattr(loop, "call_later", counted)
        for _ in range(3):
            response = await pool.request(b"POST", b"/p", [], b"x")
            assert await response.read() == b'{"echo":"x"}'
            response.release()
        assert timers == 1
        assert server.connections == 1
        with pytest.raises(NodeFailed, match="TimeoutError"):
            await pool.request(b"POST", b"/p", [], b"x")
