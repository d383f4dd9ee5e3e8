"""The gateway's own health and metrics.

    GET /v2/health/live    the process answers
    GET /v2/health/ready   some node can take traffic (503 when none can)
    GET /metrics           Prometheus

An operator's scrape sees every metric; anyone else's the public view (observe/metrics.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edgegen.gateway.state import gateway_of
from edgegen.observe.metrics import PublicView
from edgegen.security.auth import principal_of

router = APIRouter()


@router.get("/v2/health/live")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
def ready(request: Request, response: Response) -> dict[str, Any]:
    available = len(gateway_of(request).fleet.available())
    if not available:
        response.status_code = 503
    return {"ready": available > 0, "nodes_available": available}


@router.get("/metrics")
def metrics(request: Request) -> Response:
    # An operator sees everything; anyone else the public view (observe/metrics.py).
    gateway = gateway_of(request)
    source, full = gateway.metrics.source(), principal_of(request.scope).at_least("operator")
    names = full or gateway.settings.security.metrics_model_names
    text = generate_latest(source if full else PublicView(source, model_names=names))
    return Response(text, media_type=CONTENT_TYPE_LATEST)
