"""GET /gateway/alerts: error-rate spikes and latency regressions found in the shipped access lines
(gateway/alerts.py) — those active now, and the recent ones, newest first."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from edgegen.gateway.state import gateway_of

router = APIRouter(prefix="/gateway")


@router.get("/alerts")
def alerts(request: Request) -> dict[str, Any]:
    active, recent = gateway_of(request).alerts()
    return {"active": active, "recent": recent}
