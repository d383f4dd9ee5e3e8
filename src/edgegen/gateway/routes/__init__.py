"""The gateway's own routes, by concern, as one FastAPI app behind the pure-ASGI entry (app.py):

    health.py      /v2/health/live, /v2/health/ready, /metrics
    nodes.py       /gateway/nodes[/{name}[/restart]], /gateway/restart
    fleet.py       /gateway/fleet, /gateway/fleet/history
    logs.py        /gateway/logs (POST: a node's shipped lines; GET: search)
    alerts.py      /gateway/alerts
    rollout.py     /gateway/rollout, /gateway/rollback, /gateway/models/{model}/rollout
    config.py      /gateway/config[/{name}]
    software.py    /gateway/upgrade, /gateway/audit
    dashboard.py   /dashboard[/{name}]

Each route takes the parts it uses from `gateway_of(request)` (state.py). Errors are the tree's
(`edgegen.errors`), answered by the one error boundary (`{"error": "..."}`, 400 for a bad body).
"""

from __future__ import annotations

from fastapi import FastAPI

from edgegen.gateway.routes import alerts, config, dashboard, fleet, health, logs, nodes, rollout, software
from edgegen.gateway.state import GatewayState
from edgegen.http.errors import install as install_error_handlers

ROUTERS = (health, nodes, fleet, logs, alerts, rollout, config, software, dashboard)


def admin_app(gateway: GatewayState) -> FastAPI:
    # redirect_slashes off: its Location would be built from the client's Host header.
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
    install_error_handlers(app)
    app.state.gateway = gateway
    for module in ROUTERS:
        app.include_router(module.router)
    return app
