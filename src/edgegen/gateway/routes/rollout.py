"""Model versions across the fleet, node by node, health-gated (gateway/rollout.py).

    POST /gateway/rollout                  {"model", "version"} a version the nodes hold, or {"model", "url"}
    POST /gateway/rollback                 {"model", "version"?}
    POST /gateway/models/{model}/rollout   ?version=&nodes=a,b   body: a signed package archive

A rollout or rollback that cannot be made at all (unknown nodes, nothing to roll back) is a 409; one that
stopped at a node's gate answers 200 with `"ok": false` and where it stopped.
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from edgegen.gateway.rollout import NAME, RollbackOrder, RolloutOrder
from edgegen.gateway.routes.uploads import node_names, receive
from edgegen.gateway.state import gateway_of

router = APIRouter(prefix="/gateway")


@router.post("/rollout")
async def rollout(request: Request, order: RolloutOrder) -> dict[str, Any]:
    return await gateway_of(request).rollouts.rollout(order)


@router.post("/rollback")
async def rollback(request: Request, order: RollbackOrder) -> dict[str, Any]:
    return await gateway_of(request).rollouts.rollback(order)


@router.post("/models/{model}/rollout")
async def push_rollout(
    model: Annotated[str, Path(pattern=NAME)],
    request: Request,
    version: Annotated[str | None, Query(pattern=NAME)] = None,
    nodes: str | None = None,
) -> dict[str, Any]:
    """The body is a signed package archive (`edgegen models export`), sent to each node in turn."""
    gateway = gateway_of(request)
    folder = gateway.settings.home / "packages"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix="push-") as spool:
        await receive(request, spool)
        spool.flush()
        # (no validation to skip: the model and version were checked above, the source is the body)
        order = RolloutOrder.model_construct(model=model, version=version, url=None, nodes=node_names(nodes))
        return await gateway.rollouts.rollout(order, package=pathlib.Path(spool.name))
