"""The parts of the gRPC front door that tests over a socket reach only by chance: how a peer, a model
path and an error body are read."""

from __future__ import annotations

import pytest

from edgegen.http.grpc import Answer, Refusal, error_message, model_path, peer_address


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


def test_an_answer_is_ok_or_the_refusal_it_tells_of() -> None:
    assert Answer(200, [], b"{}").ok().status == 200
    with pytest.raises(Refusal) as caught:
        Answer(503, [], b'{"error": "full"}').ok()
    assert (caught.value.status, caught.value.message) == (503, "full")
