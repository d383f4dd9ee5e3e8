"""Request bodies as every route that reads its own reads them."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message, Receive

from edgegen.errors import ClientGone, InvalidInput
from edgegen.http.bodies import parse_json, read_body


def arriving(*messages: Message) -> Receive:
    queue = list(messages)

    async def receive() -> Message:
        return queue.pop(0)

    return receive


def test_a_body_in_chunks_arrives_whole() -> None:
    receive = arriving(
        {"type": "http.request", "body": b'{"input', "more_body": True},
        {"type": "http.request", "body": b'_data": [1]}', "more_body": False},
    )
    assert parse_json(asyncio.run(read_body(receive))) == {"input_data": [1]}


def test_a_client_that_leaves_mid_body_is_gone() -> None:
    receive = arriving({"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"})
    with pytest.raises(ClientGone):
        asyncio.run(read_body(receive))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"input_data": [NaN]}',
        b'{"input_data": [Infinity]}',
        b"\xff\xfe",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_bad_json_is_refused(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        parse_json(body)
