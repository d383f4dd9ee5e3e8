"""What the upload routes (a pushed package, a wheel) share: the body streamed into a sink, and the nodes
a query names."""

from __future__ import annotations

from typing import IO

from fastapi import Request

from edgegen.errors import InvalidInput


async def receive(request: Request, sink: IO[bytes]) -> int:
    """The request's body into `sink` (its size bounded by the request boundary: 413); refused when
    empty (400)."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        sink.write(chunk)
    if not size:
        raise InvalidInput("the body is empty")
    return size


def node_names(nodes: str | None) -> list[str] | None:
    """`a,b` from a query string: these nodes, in this order; None: the fleet.

    >>> node_names("n1,,n2"), node_names(None)
    (['n1', 'n2'], None)
    """
    return [n for n in nodes.split(",") if n] if nodes is not None else None
