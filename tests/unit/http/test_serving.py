"""How a server treats its connections (http/serving.py) and each request on them (http/cycle.py): an
answer's head and body leave together, headers that would split an answer are refused, pipelined requests
are answered in order, and a request's head and body arrive within their deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl

from edgegen.http.cycle import RequestCycle
from edgegen.http.serving import GuardedHttpProtocol


class Recorded:
    """A transport that records each write (what the kernel would be handed, one send(2) each)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def cycle(
    transport: Recorded, method: str = "POST", keep_alive: bool = True, done: list[str] | None = None
) -> RequestCycle:
    return RequestCycle(
        {"type": "http", "method": method},
        transport,  # type: ignore[arg-type]
        FlowControl(transport),  # type: ignore[arg-type]
        [(b"date", b"today")],
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: (done if done is not None else []).append("done"),
    )


async def test_a_whole_answer_leaves_in_one_write_with_the_servers_headers() -> None:
    raw, done = Recorded(), []
    c = cycle(raw, done=done)
    await c.send({"type": "http.response.start", "status": 200, "headers": [(b"Content-Length", b"2")]})
    assert raw.writes == []  # the head waits for the body
    await c.send({"type": "http.response.body", "body": b"{}"})
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ndate: today\r\ncontent-length: 2\r\n\r\n{}"]
    assert c.response_complete
    assert done == ["done"]
    assert not raw.closed
    await asyncio.sleep(0)
    assert len(raw.writes) == 1  # the turn's end finds nothing left to write


async def test_a_streams_head_leaves_at_the_end_of_the_turn_and_its_events_in_chunks() -> None:
    raw = Recorded()
    c = cycle(raw)
    await c.send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    await asyncio.sleep(0)
    assert raw.writes == [
        b"HTTP/1.1 200 OK\r\ndate: today\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    ]
    await c.send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    await c.send({"type": "http.response.body", "body": b"", "more_body": False})
    assert raw.writes[1:] == [b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"]


async def test_an_answer_to_head_has_no_body_and_a_closing_one_closes() -> None:
    raw = Recorded()
    c = cycle(raw, method="HEAD", keep_alive=False)
    await c.send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
    await c.send({"type": "http.response.body", "body": b"hello"})
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ndate: today\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"]
    assert raw.closed


@pytest.mark.parametrize(
    "header", [(b"x-id", b"1\r\nset-cookie: a=b"), (b"x-id\r\nset-cookie", b"1"), (b"x id", b"1")]
)
async def test_a_header_that_would_split_the_answer_is_a_500_not_written(header: tuple[bytes, bytes]) -> None:
    raw = Recorded()
    c = cycle(raw)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [header]})

    await c.run_asgi(app)
    assert raw.writes[0].startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"set-cookie" not in b"".join(raw.writes)
    assert raw.closed


async def test_a_body_longer_or_shorter_than_its_content_length_is_the_apps_error() -> None:
    for body in (b"abc", b"a"):
        c = cycle(Recorded())
        await c.send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        with pytest.raises(RuntimeError, match="Content-Length"):
            await c.send({"type": "http.response.body", "body": body})


async def test_receive_gives_the_body_as_it_came_then_waits_for_the_answer_or_the_client() -> None:
    raw = Recorded()
    c = cycle(raw)
    c.add_body(b"ab")
    c.add_body(b"cd")
    assert await c.receive() == {"type": "http.request", "body": b"abcd", "more_body": True}
    later = asyncio.ensure_future(c.receive())
    await asyncio.sleep(0)
    assert not later.done()
    c.add_body(b"e")
    c.body_complete()
    assert await later == {"type": "http.request", "body": b"e", "more_body": False}
    gone = asyncio.ensure_future(c.receive())  # what an app that watches for its client does
    await asyncio.sleep(0)
    assert not gone.done()
    await c.send({"type": "http.response.start", "status": 204, "headers": []})
    await c.send({"type": "http.response.body", "body": b""})
    assert await gone == {"type": "http.disconnect"}


class Deadlines:
    """What `GuardedHttpProtocol` reads of a server's settings: its deadlines for a request's head and
    body, and for a client to take its answer."""

    def __init__(self, head_s: float, body_s: float, send_s: float = 60.0) -> None:
        self.security = SimpleNamespace(header_timeout_s=head_s, body_timeout_s=body_s, send_timeout_s=send_s)
        self.tls = None


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body and answers with its length."""
    if scope["type"] != "http":
        return
    seen, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        seen += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(str(seen)))],
        }
    )
    await send({"type": "http.response.body", "body": str(seen).encode()})


@contextlib.asynccontextmanager
async def serving(
    head_s: float, body_s: float, keep_alive_s: float = 5, app: ASGIApp = echo, send_s: float = 60.0
) -> AsyncIterator[int]:
    """A real uvicorn server on loopback with our protocol, these deadlines and `app`; yields its port."""
    settings = Deadlines(head_s, body_s, send_s)

    class Protocol(GuardedHttpProtocol):
        load = staticmethod(lambda: settings)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        http=Protocol,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_keep_alive=keep_alive_s,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):  # uvicorn has no event for it
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def test_a_kept_alive_connection_outlives_the_head_deadline_while_requests_keep_coming() -> None:
    """The deadline moves with each request: a connection that sends one every 0.15 s for 1.2 s, past
    its first request's 0.4 s head deadline several times over, is answered every time."""
    async with serving(head_s=0.4, body_s=0.4) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(8):
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
            assert (await answer(reader)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.15)
        writer.close()


async def test_a_head_that_stops_after_requests_were_served_is_cut_off_with_408() -> None:
    async with serving(head_s=0.4, body_s=5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
        assert (await answer(reader)).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        assert (await answer(reader)).startswith(b"HTTP/1.1 408")
        assert 0.3 < time.monotonic() - started < 2
        assert await reader.read() == b""  # closed
        writer.close()


async def test_a_body_deadline_shorter_than_the_head_deadline_is_kept() -> None:
    """The timer set for the head's (longer) deadline is brought forward for the body's."""
    async with serving(head_s=5, body_s=0.3) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert b"body did not arrive" in await answer(reader)
        assert time.monotonic() - started < 2
        writer.close()


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout_and_a_busy_one_is_not() -> None:
    """uvicorn's keep-alive timeout still holds beside our deadlines: requests 0.2 s apart
    under a 0.5 s timeout keep it, 0.5 s of nothing closes it."""
    async with serving(head_s=5, body_s=5, keep_alive_s=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(5):
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
            assert (await answer(reader)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.2)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        assert 0.2 < time.monotonic() - started < 2
        writer.close()


async def test_pipelined_requests_are_answered_in_order_on_the_servers_loop() -> None:
    async with serving(head_s=5, body_s=5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok"
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\nhello, world"
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        answers = [await answer(reader) for _ in range(3)]
        assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers] == [b"2", b"12", b"3"]
        assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\ndate: " in a for a in answers)
        writer.close()


async def test_a_client_that_expects_100_continue_gets_it_when_the_app_reads_the_body() -> None:
    async with serving(head_s=5, body_s=5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        assert (await answer(reader)).endswith(b"\r\n\r\n2")
        writer.close()


async def refuse_unread(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers at once, its body unread (as a refusal does)."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 403, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


async def test_a_connection_answered_before_its_body_came_whole_is_closed_when_idle() -> None:
    async with serving(head_s=5, body_s=5, keep_alive_s=0.3, app=refuse_unread) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        assert (await answer(reader)).startswith(b"HTTP/1.1 403")
        writer.write(b"cd")  # the rest of the body, then nothing
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the keep-alive timeout
        assert 0.2 < time.monotonic() - started < 2
        writer.close()


async def test_a_client_that_stops_taking_its_answer_is_cut_off_after_the_send_timeout() -> None:
    """A client that asked for a large answer and reads none of it: once the socket's buffers are full, the
    app's sends wait for the client at most `send_timeout_s`; then the connection is cut and the app's
    sends go nowhere, so it ends. Before, they waited for good, holding what the app held (a stream's
    generation at a node, a gateway's connection to one)."""
    ended = asyncio.Event()

    async def endless(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        piece = b"x" * 65536
        for _ in range(4096):  # 256 MiB, far more than loopback's buffers hold
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        ended.set()

    async with serving(head_s=5, body_s=5, app=endless, send_s=0.5) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        await asyncio.wait_for(ended.wait(), 20)
        assert time.monotonic() - started < 15
        sock.close()
