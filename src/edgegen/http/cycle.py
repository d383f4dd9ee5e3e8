"""One request's ASGI cycle on a connection of `GuardedHttpProtocol` (serving.py): the body the client sent,
handed to the app by `receive`, and the app's answer, written by `send`.

It takes the place of uvicorn's own cycle: an `asyncio.Event` made per request and awaited even for a body
that came whole with its head, two regular-expression searches per response header, a timer made and
cancelled per answer for the keep-alive timeout, and the head and body written apart. With this one a node
answers 1.10–1.19× the predictions a second at 64 clients, at ~16 µs less CPU each (docs/benchmarks.md,
"2026-12-04, later"). Here:

- the body is kept as the chunks that arrived and joined once; `receive` returns at once when it is whole,
  and otherwise waits on a future made only then;
- the answer's head goes with its first piece of body in one write — a whole answer is one send(2) — and
  at the latest at the end of the loop's turn, so a stream's head does not wait for its first event;
- every header name and value is still checked (no CR, LF or control byte can split an answer), in one
  search over all names and one over all values.

The protocol owns the connection (keep-alive, pipelining, deadlines, flow control) and feeds the cycle its
body (`add_body`, `body_complete`); a cycle knows only its request. What uvicorn's protocol still reads of
a cycle keeps uvicorn's names: `message_event`, `disconnected`, `keep_alive`, `response_complete`,
`run_asgi`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, FlowControl
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE

log = logging.getLogger("edgegen.http")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_SERVER_ERROR = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"),
                 (b"connection", b"close")]  # fmt: skip


class Arrival:
    """Set when more of the body, its end, the answer's end or a disconnect has come; `receive` waits for it.
    uvicorn's protocol calls `set` (an `asyncio.Event`'s interface, without its per-request cost)."""

    __slots__ = ("_waiter", "is_set")

    def __init__(self) -> None:
        self.is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self.is_set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        if not self.is_set:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class RequestCycle:
    def __init__(
        self,
        scope: dict[str, Any],
        transport: asyncio.Transport,
        flow: FlowControl,
        default_headers: list[tuple[bytes, bytes]],
        *,
        expect_100_continue: bool,
        keep_alive: bool,
        on_response: Callable[[], None],
        send_timeout_s: float = 60.0,
    ) -> None:
        self.scope = scope
        self.send_timeout_s = send_timeout_s
        self.transport = transport
        self.flow = flow
        self.default_headers = default_headers
        self.on_response = on_response
        self.message_event = Arrival()
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        self.chunks: list[bytes] = []
        self.size = 0
        self.more_body = True
        self.response_started = False
        self.response_complete = False
        self._chunked = False
        self._length_left: int | None = None  # what the answer's Content-Length still expects
        self._head: bytes | None = None  # the answer's head, waiting for its first piece of body

    # -- the request's body, as the protocol parses it
    def add_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.size += len(body)
        if self.size > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        self.message_event.set()

    def body_complete(self) -> None:
        self.more_body = False
        self.message_event.set()

    # -- ASGI
    async def run_asgi(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            log.error("the app failed", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self.transport.close()
        else:
            if not self.response_started and not self.disconnected:
                log.error("the app returned without answering")
                await self._send_500()
            elif not self.response_complete and not self.disconnected:
                log.error("the app returned before its answer was whole")
                self.transport.close()
        finally:
            self.on_response = _nothing

    async def _send_500(self) -> None:
        await self.send({"type": "http.response.start", "status": 500, "headers": _SERVER_ERROR})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error"})

    async def receive(self) -> Message:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(_CONTINUE)
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            await self.message_event.wait()
            self.message_event.is_set = False
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks, self.size = [], 0
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: Message) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self._drained()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {message['type']}")
            self._start(message["status"], message.get("headers", ()))
            return
        if self.response_complete:
            raise RuntimeError(f"{message['type']} after the answer was whole")
        if message["type"] != "http.response.body":
            raise RuntimeError(f"expected http.response.body, got {message['type']}")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self.scope["method"] == "HEAD":
            body = b""
        elif self._chunked:
            body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + (b"" if more else b"0\r\n\r\n")
        elif self._length_left is not None:
            self._length_left -= len(body)
            if self._length_left < 0:
                raise RuntimeError("the answer's body is longer than its Content-Length")
        head, self._head = self._head, None
        if head is not None:
            body = head + body
        if body:
            self.transport.write(body)
        if not more:
            if self._length_left and self.scope["method"] != "HEAD":
                raise RuntimeError("the answer's body is shorter than its Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    async def _drained(self) -> None:
        """The client takes some of what waits to be written within `send_timeout_s`, or its connection
        is cut (aborted: closing would wait for the unsent bytes) as if it left: what the app sends later
        goes nowhere, and an app that watches for its client stops. Else a client that stops reading
        held its answer's producer (a stream's generation, a gateway's connection to a node) for good."""
        try:
            await asyncio.wait_for(self.flow.drain(), self.send_timeout_s)
        except TimeoutError:
            log.info("a client took none of its answer in time; its connection is cut",
                     extra={"send_timeout_s": self.send_timeout_s})  # fmt: skip
            self.disconnected = True
            self.message_event.set()
            self.transport.abort()

    def _start(self, status: int, headers: Any) -> None:
        fields = [*self.default_headers, *headers]
        # uvicorn's checks: what a header name (an RFC 9110 token) and a value (controls but tab) may not
        # hold. An app's header that would split the answer or smuggle another is the app's error.
        names = b"".join(name for name, _ in fields)
        if HEADER_RE.search(names) or HEADER_VALUE_RE.search(b"".join(value for _, value in fields)):
            raise RuntimeError("an answer's header has a byte no header may have")  # (a 500 still goes)
        self.response_started = True
        self.waiting_for_100_continue = False
        head = [STATUS_LINE[status]]
        close = False
        for name, value in fields:
            lowered = name.lower()
            if lowered == b"content-length" and self._length_left is None and not self._chunked:
                self._length_left = int(value)
            elif lowered == b"transfer-encoding" and value.lower() == b"chunked":
                self._chunked, self._length_left = True, None
            elif lowered == b"connection" and b"close" in value.lower():
                self.keep_alive, close = False, True
            head += (lowered, b": ", value, b"\r\n")
        if not self.keep_alive and not close:
            head.append(b"connection: close\r\n")
        if (
            self._length_left is None
            and not self._chunked
            and self.scope["method"] != "HEAD"
            and status not in (204, 304)
        ):
            self._chunked = True
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        self._head = b"".join(head)
        # The head leaves with the body's first piece, or at the end of this turn of the loop if none comes.
        asyncio.get_running_loop().call_soon(self._flush_head)

    def _flush_head(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self.transport.is_closing():
            self.transport.write(head)


def _nothing() -> None:
    pass
