"""What a node's `GrpcCalls` answers for a call that outlives its deadline, is refused, or fails
unexpectedly: what tests over a socket reach only by chance."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from edgegen.errors import Overloaded
from edgegen.http.grpc import CODES, error_message
from edgegen.node.grpc_server import CALL, GrpcCall, GrpcCalls
from edgegen.node.state import NodeState


class Recorder:
    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self.passed: list[Scope] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            self.body += message.get("body", b"")

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.passed.append(scope)


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def run(handler: Any, deadline_s: float | None = None) -> tuple[Recorder, GrpcCall]:
    recorder = Recorder()
    calls = GrpcCalls(recorder.app, NodeState.__new__(NodeState))
    call = GrpcCall("ModelInfer", handler, request=None, deadline_s=deadline_s)
    await calls({"type": "http", CALL: call}, receive, recorder.send)
    return recorder, call


async def test_a_call_past_its_deadline_is_504() -> None:
    async def slow(node: NodeState, scope: Scope, request: Any) -> Any:
        await asyncio.sleep(5)

    recorder, call = await run(slow, deadline_s=0.05)
    assert recorder.status == 504
    assert CODES[504].name == "DEADLINE_EXCEEDED"
    assert "deadline" in error_message(recorder.body)
    assert call.response is None


async def test_an_edgegen_error_is_its_http_answer_with_its_headers() -> None:
    async def full(node: NodeState, scope: Scope, request: Any) -> Any:
        raise Overloaded("model 'digits' is at capacity; retry shortly", retry_after=2)

    recorder, call = await run(full)
    assert (recorder.status, error_message(recorder.body)) == (
        503,
        "model 'digits' is at capacity; retry shortly",
    )
    assert call.headers == {"Retry-After": "2"}
    assert CODES[503].name == "UNAVAILABLE"


async def test_an_unexpected_failure_is_an_internal_error_without_its_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(node: NodeState, scope: Scope, request: Any) -> Any:
        raise RuntimeError("/secret/path exploded")

    with caplog.at_level(logging.ERROR, "edgegen.grpc"):
        recorder, _ = await run(broken)
    assert (recorder.status, error_message(recorder.body)) == (500, "internal error")
    assert any("unhandled error" in r.message for r in caplog.records)


async def test_an_http_request_goes_on_to_the_routes() -> None:
    recorder = Recorder()
    calls = GrpcCalls(recorder.app, NodeState.__new__(NodeState))
    scope = {"type": "http", "path": "/predict"}
    await calls(scope, receive, recorder.send)
    assert recorder.passed == [scope]
