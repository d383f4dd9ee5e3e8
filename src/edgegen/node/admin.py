"""A node's admin routes (operator or admin role; over mutual TLS only from a gateway or an admin
certificate — the security gate decides, before any of this runs).

    GET  /admin/models                     every model in the store: versions, the active and served one
    POST /admin/models/{name}/activate     {"version": "3"}: check the package, serve it; a version
                                           that fails to load leaves the served one in place (422)
    GET  /admin/packages                   installed Python packages, for the gateway's vulnerability scan
    GET  /admin/audit?limit=50             the audit log's last entries and whether its chain holds
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from edgegen.errors import InvalidInput, ModelNotFound, Unprocessable
from edgegen.node.state import node_of
from edgegen.security.vulns import installed_packages
from edgegen.store.manifest import check_name

router = APIRouter(prefix="/admin", tags=["admin"])


class Activation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64)


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


@router.get("/models", summary="The model store: versions, active and served")
async def models(request: Request) -> Response:
    node = node_of(request)
    out = []
    for info in node.store.list():
        served = node.registry.get(info.name).manifest.version if node.registry.is_ready(info.name) else None
        out.append({"name": info.name, "versions": info.versions, "active": info.active, "served": served})
    return _json({"models": out})


@router.post("/models/{name}/activate", summary="Serve another version of a model")
async def activate(name: str, change: Activation, request: Request) -> Response:
    node = node_of(request)
    check_name(name)
    version = check_name(change.version, "version")
    if version not in node.store.versions(name):
        raise ModelNotFound(f"model {name!r} has no version {version!r}")
    previous = node.store.active_version(name)
    node.store.activate(name, version)  # checks the package (hashes, signature) first
    await node.registry.refresh()
    served = node.registry.get(name).manifest.version if node.registry.is_ready(name) else None
    if served != version:
        if previous is not None:
            node.store.activate(name, previous)
        raise Unprocessable(f"version {version} of {name!r} failed to load; version {served} is still served")
    return _json({"name": name, "active": version, "previous": previous})


@router.get("/packages", summary="The Python packages this node runs (for the fleet's vulnerability scan)")
async def packages(request: Request) -> Response:
    node = node_of(request)
    if node.packages is None:
        node.packages = installed_packages()
    return _json({"packages": [{"name": n, "version": v} for n, v in node.packages]})


@router.get("/audit", summary="The audit log's last entries")
async def audit(request: Request, limit: int = Query(50, ge=1, le=1000)) -> Response:
    log = node_of(request).audit
    if log is None:
        raise InvalidInput("this node keeps no audit log")
    entries = [entry.__dict__ for entry in log.tail(limit)]
    return _json({"entries": entries, "chain_broken_at": log.verify()})
