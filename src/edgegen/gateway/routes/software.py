"""edgegen itself on the fleet: the upgrade, and the vulnerability audit of what the nodes run.

    POST /gateway/upgrade[?nodes=a,b]   body: the wheel; X-Edgegen-Wheel: its file name;
                                        X-Edgegen-Signature: its signature record (gateway/upgrade.py)
    GET  /gateway/audit                 every node's packages against the imported advisories (audit.py)

The wheel is read whole (it is small, and every node gets the same bytes); a package pushed for a rollout is
spooled to disk instead (routes/rollout.py).
"""

from __future__ import annotations

import io
import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request

from edgegen.gateway.routes.uploads import node_names, receive
from edgegen.gateway.state import gateway_of
from edgegen.gateway.upgrade import Wheel

UPGRADE = re.compile("/gateway/upgrade")  # an upload route: the request boundary allows it MAX_WHEEL_BYTES
MAX_WHEEL_BYTES = 64 << 20  # an edgegen wheel is a few hundred KiB
router = APIRouter(prefix="/gateway")


@router.post("/upgrade")
async def upgrade(
    request: Request,
    wheel: Annotated[str, Header(alias="x-edgegen-wheel", max_length=200)],
    signature: Annotated[str, Header(alias="x-edgegen-signature", max_length=1000)],
    nodes: str | None = None,
) -> dict[str, Any]:
    data = io.BytesIO()
    await receive(request, data)
    return await gateway_of(request).upgrades.upgrade(
        Wheel(wheel, data.getvalue(), signature), node_names(nodes)
    )


@router.get("/audit")
async def audit(request: Request) -> dict[str, Any]:
    return await gateway_of(request).audit.scan()
