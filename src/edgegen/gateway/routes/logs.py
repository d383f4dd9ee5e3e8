"""The fleet's logs (fleetlogs.py, logstore.py).

    POST /gateway/logs   a node's shipped batch: {"node", "spool", "entries": [[seq, {line}], …]}
    GET  /gateway/logs   ?node=&level=&since=&until=&request_id=&trace_id=&text=&limit=   (oldest first)

A node that ships with its certificate ships its own lines only (fleetlogs.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from edgegen.gateway.logstore import MAX_LIMIT
from edgegen.gateway.logstore import Query as LogQuery
from edgegen.gateway.state import gateway_of
from edgegen.http.boundary import REQUEST_ID
from edgegen.observe.tracing import TRACE_ID
from edgegen.security.auth import principal_of

router = APIRouter(prefix="/gateway")


@router.post("/logs")
async def logs_in(request: Request) -> dict[str, int]:
    return await gateway_of(request).logs.receive(await request.body(), principal_of(request.scope))


@router.get("/logs")
async def logs_out(
    request: Request,
    node: str | None = None,
    level: str | None = None,
    since: float | None = None,
    until: float | None = None,
    request_id: Annotated[str | None, Query(pattern=REQUEST_ID)] = None,
    trace_id: Annotated[str | None, Query(pattern=TRACE_ID)] = None,
    text: Annotated[str | None, Query(max_length=1000)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> dict[str, Any]:
    query = LogQuery(node, level, since, until, request_id, text, limit, trace_id)
    return {"lines": await gateway_of(request).logs.search(query)}
