"""The fleet at run time, and restarts.

    GET    /gateway/nodes                 every node's routing state (operator)
    POST   /gateway/nodes                 add one: {"url", "name"?, "weight"?} (201; 409 when its name or
                                          URL is taken)
    PATCH  /gateway/nodes/{name}          {"weight"?, "draining"?}
    DELETE /gateway/nodes/{name}          out of the fleet; the requests still there finish first
    POST   /gateway/nodes/{name}/restart  drain, restart in place, back once ready (restarts.py)
    POST   /gateway/restart               every node so, in turn

A change here lasts until the gateway restarts: the configuration file is never written. With several
workers it reaches all of them (shared.py). The routes run on the event loop, as the relay does: the
fleet is never changed from another thread while a request reads it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from edgegen.errors import ConfigError, Conflict, NotFound
from edgegen.gateway.settings import NodeEntry
from edgegen.gateway.state import gateway_of

log = logging.getLogger("edgegen.gateway")
router = APIRouter(prefix="/gateway")


class NodeUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: int | None = Field(None, ge=1, le=1000)
    draining: bool | None = None


@router.get("/nodes")
async def nodes(request: Request) -> dict[str, Any]:
    return {"nodes": gateway_of(request).fleet.snapshot()}


@router.post("/nodes", status_code=201)
async def add(request: Request, entry: NodeEntry) -> dict[str, object]:
    fleet = gateway_of(request).fleet
    try:
        member = fleet.add(entry)
    except ConfigError as exc:
        raise Conflict(exc.message) from None
    log.info("node added", extra={"node": member.backend.name, "url": entry.url})
    return member.describe(fleet.clock())


@router.patch("/nodes/{name}")
async def update(request: Request, name: str, change: NodeUpdate) -> dict[str, object]:
    fleet = gateway_of(request).fleet
    if name not in fleet.nodes:
        raise NotFound(f"no node named {name!r}")
    if change.weight is not None:
        fleet.set_weight(name, change.weight)
    if change.draining is not None:
        fleet.set_draining(name, change.draining)
    log.info("node changed", extra={"node": name, **change.model_dump(exclude_none=True)})
    return fleet.nodes[name].describe(fleet.clock())


@router.delete("/nodes/{name}")
async def remove(request: Request, name: str) -> dict[str, object]:
    gateway = gateway_of(request)
    if name not in gateway.fleet.nodes:
        raise NotFound(f"no node named {name!r}")
    member = gateway.fleet.remove(name)
    log.info("node removed", extra={"node": name})
    await gateway.proxy.retire(member.backend)  # requests already there finish first
    return member.describe(gateway.fleet.clock())


@router.post("/nodes/{name}/restart")
async def restart_one(request: Request, name: str) -> dict[str, Any]:
    return await gateway_of(request).restarts.restart(name)


@router.post("/restart")
async def restart_all(request: Request) -> dict[str, Any]:
    return await gateway_of(request).restarts.restart_all()
