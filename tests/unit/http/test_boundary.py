"""The request boundary (http/boundary.py) around an app: what it counts and logs of a request that
ends without an answer."""

from __future__ import annotations

import asyncio
import os

import orjson
import pytest
from starlette.types import Message, Receive, Scope, Send

from edgegen.http.boundary import RequestBoundary
from edgegen.observe.logs import AccessLog


class Counted:
    """What the boundary tells its observer (a node's or a gateway's metrics)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str, int]] = []

    def observe_request(self, template: str, method: str, model: str, status: int, seconds: float) -> None:
        self.requests.append((template, method, model, status))


def scope() -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/digits/infer",
        "headers": [(b"content-length", b"2")],
        "edgegen.route": "/v2/models/{name}/infer",
    }


async def receive() -> Message:
    return {"type": "http.request", "body": b"{}", "more_body": False}


async def send(message: Message) -> None:
    pass


async def test_a_request_cancelled_before_its_answer_is_499_not_a_server_error() -> None:
    """gRPC cancels a call at its client's deadline (or when the client cancels it): the request was
    counted and logged as 500, a server error, which the fleet's error-rate alerts read."""
    started = asyncio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        started.set()
        await asyncio.sleep(60)

    read, write = os.pipe()
    counted, access_log = Counted(), AccessLog(fd=write)
    boundary = RequestBoundary(slow, counted, access_log, max_body_bytes=1024, max_header_bytes=1024)
    call = asyncio.ensure_future(boundary(scope(), receive, send))
    await started.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    access_log.flush()
    os.close(write)
    with os.fdopen(read, "rb") as lines:
        [line] = [orjson.loads(line) for line in lines]
    assert counted.requests == [("/v2/models/{name}/infer", "POST", "", 499)]
    assert line["status"] == 499


async def test_a_request_cancelled_after_its_answer_began_keeps_that_status() -> None:
    async def streams(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(60)

    counted = Counted()
    boundary = RequestBoundary(
        streams, counted, AccessLog(enabled=False), max_body_bytes=1024, max_header_bytes=1024
    )
    call = asyncio.ensure_future(boundary(scope(), receive, send))
    await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert [status for *_, status in counted.requests] == [200]
