"""Relay floors for `bench/gateway.py --floors`: the least a Python relay built on the gateway's own
upstream pool (src/edgegen/gateway/upstream.py) can cost per request, with nothing of the gateway around
it — no request boundary, no security gate, no balancer, retries, metrics or access log.

    protocol  its own server loop: an asyncio.Protocol on httptools, no ASGI (what a relay loop of the
              gateway's own would start from)
    uvicorn   the same relay as a raw ASGI app under uvicorn's own protocol (uvloop, httptools)
    guarded   the same ASGI app under the gateway's protocol (http/serving.py: uvicorn's, with deadlines
              and the request cycle of http/cycle.py), as the gateway runs

The difference between the first two is what uvicorn's request cycle and ASGI cost; `guarded` against
`uvicorn`, what ours changes of it; the gateway's own CPU above `guarded` is what its layers cost. Each
relays every request to one node and its answer back whole (a small body of known length, as every
prediction is); none streams, and a request arriving while the last answer is on its way is not supported
by `protocol` (wrk does not pipeline). Not a product: a measurement.

    python bench/baselines/relay_floor.py {protocol|uvicorn|guarded} PORT NODE_URL
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

import httptools
import uvicorn
import uvloop

from edgegen.gateway.app import HttpProtocol
from edgegen.gateway.upstream import NodePool

HOP = frozenset({b"connection", b"keep-alive", b"host", b"content-length", b"transfer-encoding", b"date"})
FORWARDED = (b"x-forwarded-for", b"127.0.0.1")
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Message, Receive, Send], Awaitable[None]]


def new_pool(node: str) -> NodePool:
    return NodePool(node, None, limit=512, connect_timeout_s=5.0, read_timeout_s=30.0)


async def relayed(
    pool: NodePool, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The node's status, headers (hop-by-hop ones dropped) and whole body."""
    fields = [(k, v) for k, v in headers if k not in HOP]
    fields.append(FORWARDED)
    response = await pool.request(method, target, fields, body)
    try:
        data = await response.read()
    finally:
        response.release()
    return response.status, [(k, v) for k, v in response.headers if k not in HOP], data


class RelayProtocol(asyncio.Protocol):
    """One client connection: requests parsed by httptools, each relayed as it completes."""

    def __init__(self, pool: NodePool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is one, not its subclass)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = (self.parser.get_method(), self.url, self.headers, b"".join(self.body))
        asyncio.get_running_loop().create_task(self.answer(*request))

    async def answer(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        status, fields, data = await relayed(self.pool, method, target, headers, body)
        head = [b"HTTP/1.1 %d -\r\n" % status]
        for key, value in fields:
            head += [key, b": ", value, b"\r\n"]
        head.append(b"content-length: %d\r\n\r\n" % len(data))
        assert self.transport is not None
        self.transport.write(b"".join(head) + data)


def asgi_relay(node: str) -> App:
    pools: list[NodePool] = []  # made in the server's loop, at the first request

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if not pools:
            pools.append(new_pool(node))
        pool = pools[0]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        status, fields, data = await relayed(pool, scope["method"].encode(), target, scope["headers"], body)
        fields.append((b"content-length", b"%d" % len(data)))
        await send({"type": "http.response.start", "status": status, "headers": fields})
        await send({"type": "http.response.body", "body": data})

    return app


async def serve_protocol(port: int, node: str) -> None:
    pool = new_pool(node)
    server = await asyncio.get_running_loop().create_server(lambda: RelayProtocol(pool), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    kind, port, node = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if kind == "protocol":
        uvloop.run(serve_protocol(port, node))
        return
    # The gateway's protocol reads its deadlines from the gateway's settings: the defaults, here.
    http = "httptools" if kind == "uvicorn" else HttpProtocol
    uvicorn.run(asgi_relay(node), host="127.0.0.1", port=port, loop="uvloop", http=http,
                access_log=False, log_config=None, server_header=False)  # fmt: skip


if __name__ == "__main__":
    main()
