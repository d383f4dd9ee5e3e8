"""The parts of the gRPC server that tests over a socket reach only by chance: how a peer and a model path
are read, and what `GrpcCalls` answers for a call that outlives its deadline or fails unexpectedly."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from edgegen.errors import Overloaded
from edgegen.node.grpc_server import CALL, CODES, GrpcCall, GrpcCalls, _message, _model_path, peer_address
from edgegen.node.state import NodeState


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        ("ipv4:127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("ipv6:%5B::1%5D:7000", ("::1", 7000)),
        ("ipv6:[2001:db8::2]:443", ("2001:db8::2", 443)),
        ("unix:/run/edgegen.sock", ("", 0)),
        ("ipv4:10.0.0.1:x", ("10.0.0.1", 0)),
    ],
)
def test_peers_read_as_asgi_clients(peer: str, client: tuple[str, int]) -> None:
    assert peer_address(peer) == client


def test_a_model_path_encodes_what_the_gate_must_see_raw() -> None:
    assert _model_path("digits", "", "/infer") == ("/v2/models/digits/infer",) * 2
    assert _model_path("digits", "2", "") == ("/v2/models/digits/versions/2",) * 2
    decoded, raw = _model_path("a/../b", "1%2F", "/config")
    assert decoded == "/v2/models/a/../b/versions/1%2F/config"
    assert raw == "/v2/models/a%2F..%2Fb/versions/1%252F/config"


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
    assert "deadline" in _message(recorder.body)
    assert call.response is None


async def test_an_edgegen_error_is_its_http_answer_with_its_headers() -> None:
    async def full(node: NodeState, scope: Scope, request: Any) -> Any:
        raise Overloaded("model 'digits' is at capacity; retry shortly", retry_after=2)

    recorder, call = await run(full)
    assert (recorder.status, _message(recorder.body)) == (503, "model 'digits' is at capacity; retry shortly")
    assert call.metadata == {"Retry-After": "2"}
    assert CODES[503].name == "UNAVAILABLE"


async def test_an_unexpected_failure_is_an_internal_error_without_its_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(node: NodeState, scope: Scope, request: Any) -> Any:
        raise RuntimeError("/secret/path exploded")

    with caplog.at_level(logging.ERROR, "edgegen.grpc"):
        recorder, _ = await run(broken)
    assert (recorder.status, _message(recorder.body)) == (500, "internal error")
    assert any("unhandled error" in r.message for r in caplog.records)


async def test_an_http_request_goes_on_to_the_routes() -> None:
    recorder = Recorder()
    calls = GrpcCalls(recorder.app, NodeState.__new__(NodeState))
    scope = {"type": "http", "path": "/predict"}
    await calls(scope, receive, recorder.send)
    assert recorder.passed == [scope]


def test_an_error_body_that_is_not_ours_reads_as_internal() -> None:
    assert _message(b"<html>") == "internal error"
    assert _message(b'{"error": {"message": "x"}}') == "internal error"
    assert _message(b'{"error": "no"}') == "no"
