"""The parts of the gRPC front door that tests over a socket reach only by chance: how a peer, a model
path and an error body are read."""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest
from starlette.types import Receive, Scope, Send

from edgegen.gateway.settings import GatewaySettings
from edgegen.http.grpc import (
    SERVICE,
    Answer,
    GrpcServer,
    Refusal,
    Rpc,
    Twin,
    error_message,
    model_path,
    peer_address,
)
from edgegen.http.grpc_messages import message


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
    assert model_path("digits", "", "/infer") == ("/v2/models/digits/infer",) * 2
    assert model_path("digits", "2", "") == ("/v2/models/digits/versions/2",) * 2
    decoded, raw = model_path("a/../b", "1%2F", "/config")
    assert decoded == "/v2/models/a/../b/versions/1%2F/config"
    assert raw == "/v2/models/a%2F..%2Fb/versions/1%252F/config"


def test_an_error_body_that_is_not_ours_reads_as_internal() -> None:
    assert error_message(b"<html>") == "internal error"
    assert error_message(b'{"error": {"message": "x"}}') == "internal error"
    assert error_message(b'{"error": "no"}') == "no"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_answer_is_ok_or_the_refusal_it_tells_of() -> None:
    assert Answer(200, [], b"{}").ok().status == 200
    with pytest.raises(Refusal) as caught:
        Answer(503, [], b'{"error": "full"}').ok()
    assert (caught.value.status, caught.value.message) == (503, "full")


async def test_a_fault_in_a_reply_is_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Not UNKNOWN, which grpcio answers for an exception it is left with (and logs nothing of ours)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"not json"})

    def unreadable(request: Any, twin: Twin, answer: Answer) -> Any:
        raise ValueError("the reply cannot read this answer")

    rpc = Rpc(
        "ServerLiveRequest",
        "ServerLiveResponse",
        lambda request, deadline: Twin("GET", "/x", "/x"),
        unreadable,
    )
    settings = GatewaySettings(grpc_port=free_port(), security={"auth": False})
    server = GrpcServer(settings, app, {"ServerLive": rpc})
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            call = channel.unary_unary(
                f"/{SERVICE}/ServerLive",
                request_serializer=message("ServerLiveRequest").SerializeToString,
                response_deserializer=message("ServerLiveResponse").FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(message("ServerLiveRequest")(), timeout=5)
    finally:
        await server.stop()
    assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.INTERNAL, "internal error")
    assert any(r.getMessage() == "gRPC call failed" and r.exc_info for r in caplog.records)
