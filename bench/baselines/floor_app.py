"""A bare HTTP floor for `bench/predict.py`: the least a Python server on uvicorn can do per request.

A raw ASGI app, no framework: it reads the whole body, parses it with orjson (as any JSON endpoint must)
and answers a constant `{"prediction": [[0.0, ... 10 times]]}`. Run it as our node runs:

    uvicorn floor_app:app --app-dir bench/baselines --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ANSWER = orjson.dumps({"prediction": [[0.0] * 10]})
NOT_JSON = b'{"error": "the body is not JSON"}'


def _headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


HEADERS = _headers(ANSWER)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    status, answer, headers = 200, ANSWER, HEADERS
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        status, answer, headers = 400, NOT_JSON, _headers(NOT_JSON)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})
