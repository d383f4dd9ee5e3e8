"""How a server treats its connections (http/serving.py): an answer's head and body leave together, and a
request's head and body arrive within their deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import uvicorn
from starlette.types import Receive, Scope, Send

from edgegen.http.serving import CoalescedWrites, GuardedHttpProtocol


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


async def test_writes_in_one_turn_of_the_loop_leave_as_one() -> None:
    raw = Recorded()
    transport = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert raw.writes == []
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"data: 1\n\n")  # a stream's next event: its own turn, its own write
    await asyncio.sleep(0)
    assert raw.writes[1:] == [b"data: 1\n\n"]
    assert transport.get_extra_info("peername") == "info:peername"


async def test_a_large_body_goes_at_once_after_what_waits_and_close_sends_what_is_left() -> None:
    raw = Recorded()
    transport = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    large = b"x" * CoalescedWrites.LARGE
    transport.write(b"head")
    transport.write(large)
    assert raw.writes == [b"head", large]
    transport.write(b"last")
    transport.close()
    assert raw.writes[2:] == [b"last"]
    assert raw.closed
    await asyncio.sleep(0)
    assert len(raw.writes) == 3  # nothing written twice, nothing after the close


class Deadlines:
    """What `GuardedHttpProtocol` reads of a server's settings: a head deadline and a body deadline."""

    def __init__(self, head_s: float, body_s: float) -> None:
        self.security = SimpleNamespace(header_timeout_s=head_s, body_timeout_s=body_s)
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
async def serving(head_s: float, body_s: float, keep_alive_s: float = 5) -> AsyncIterator[int]:
    """A real uvicorn server on loopback with our protocol and these deadlines; yields its port."""
    settings = Deadlines(head_s, body_s)

    class Protocol(GuardedHttpProtocol):
        load = staticmethod(lambda: settings)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        echo,
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
