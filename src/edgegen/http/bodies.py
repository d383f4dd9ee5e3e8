"""Request bodies, read one way by every route that reads its own: whole, then parsed as JSON.

The request boundary (http/boundary.py) already bounds how much may arrive; here a client that leaves
before its body is whole is `ClientGone` (499 in the access line, nobody to answer), and JSON is parsed
by orjson, which refuses NaN/Infinity, over-deep nesting and invalid UTF-8.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import Receive

from edgegen.errors import ClientGone, InvalidInput


async def read_body(receive: Receive) -> bytes:
    """The request's body, whole."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client disconnected before its request arrived whole")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """A request body as JSON, or InvalidInput saying why not."""
    if not body:
        raise InvalidInput("the request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc.msg}") from None
