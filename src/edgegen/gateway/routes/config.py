"""The nodes' run-time settings, through the gateway (each node's /admin/config does the work).

    GET   /gateway/config/{name}   a node's settings
    PATCH /gateway/config          {"changes": {...}, "nodes": [...]?}: the same change on each node in turn

A node's refusal reaches the client with the node's 4xx and its reason; a node that does not answer, or
fails, is a 502.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from edgegen.errors import NotFound, UpstreamError
from edgegen.gateway.nodes import refusal
from edgegen.gateway.state import gateway_of

router = APIRouter(prefix="/gateway")


class ConfigOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    changes: dict[str, Any]
    nodes: list[str] | None = None


@router.get("/config/{name}")
async def node_config(request: Request, name: str) -> Any:
    gateway = gateway_of(request)
    member = gateway.fleet.nodes.get(name)
    if member is None:
        raise NotFound(f"no node named {name!r}")
    status, answer = await gateway.nodes.config(member, "GET")
    if status != 200:
        raise UpstreamError(f"node {name!r} answered {status}")
    return answer


@router.patch("/config")
async def change_config(request: Request, order: ConfigOrder) -> dict[str, Any]:
    """The same change on each node in turn; a change a node refuses stops there (the others keep
    theirs: every node validates the same way, so the first refusal is the usual one)."""
    gateway = gateway_of(request)
    fleet = gateway.fleet
    names = order.nodes if order.nodes is not None else list(fleet.nodes)
    if unknown := [n for n in names if n not in fleet.nodes]:
        raise NotFound(f"unknown nodes: {', '.join(unknown)}")
    results = {}
    for name in names:
        status, answer = await gateway.nodes.config(fleet.nodes[name], "PATCH", {"changes": order.changes})
        if status != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise refusal(status, f"node {name!r}: {error or status}")
        results[name] = answer
    return {"nodes": results}
