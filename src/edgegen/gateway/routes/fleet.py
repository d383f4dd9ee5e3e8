"""The fleet at a glance, as the gateway saw it (the dashboard's data).

    GET /gateway/fleet           every node: health, routing state, load, version, models, p50/p99 and
                                 rates, last seen
    GET /gateway/fleet/history   each node's rates and p50/p99 over the last `health.history_s`

Both read what the gateway keeps (fleet.py: its health checks, the nodes' statuses, the traffic it relayed);
neither calls a node.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from edgegen.gateway.state import gateway_of

router = APIRouter(prefix="/gateway")


@router.get("/fleet/history")
def fleet_history(request: Request, since: float = 0.0) -> dict[str, Any]:
    """Each node's traffic as the fleet view showed it, every `status_interval_s`, since `since`
    (seconds since the epoch): [[time, requests/s, p50 ms, p99 ms, errors/s], …], oldest first."""
    gateway = gateway_of(request)
    if gateway.shared is not None:  # several workers: the leader's points, whichever worker answers
        nodes: dict[str, list[Any]] = gateway.shared.history(since)
    else:
        nodes = gateway.fleet.history(since)
    return {
        "time": time.time(),
        "interval_s": gateway.settings.health.status_interval_s,
        "fields": ["time", "requests_per_s", "p50_ms", "p99_ms", "errors_per_s"],
        "nodes": nodes,
    }


@router.get("/fleet")
def fleet_view(request: Request) -> dict[str, Any]:
    fleet = gateway_of(request).fleet
    view = fleet.view()
    return {
        "nodes": view,
        "known": len(view),
        "available": len(fleet.available()),
        "requests_per_s": round(sum(n["traffic"]["requests_per_s"] for n in view), 3),
    }
