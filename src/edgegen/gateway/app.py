"""`edgegen gateway`: the one public entry of a fleet of nodes. This module builds its parts and runs them.

    client ─▶ RequestBoundary ─▶ SecurityGate ─▶ Gateway._http ─┬─▶ the gateway's own routes (routes/):
              (http/boundary.py: request id,                    │   /gateway/…, /metrics, /dashboard,
               limits, access line)                             │   /v2/health/live, /v2/health/ready
                                                                └─▶ everything else, relayed to a node
                                                                    (proxy.py): /predict, /models/…, /v1/…

Every request passes the request boundary and the security gate first (security/gate.py: credentials,
roles, rate limits, intrusion guard). Pure ASGI in front, so a relayed request costs no framework
routing; the few admin routes are a FastAPI app behind it. For as long as the lifespan runs, so do the
background loops (background.py): health checks, node status, log analysis and purge.

`Gateway` is the one composition root: each part is built once, whole, with what it needs, and shared
with the routes and loops as a `GatewayState` (state.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from edgegen.errors import EdgegenError, PayloadTooLarge, is_openai
from edgegen.gateway import background
from edgegen.gateway.alerts import Analyzer
from edgegen.gateway.audit import FleetAudit
from edgegen.gateway.fleet import Fleet
from edgegen.gateway.fleetlogs import FleetLogs
from edgegen.gateway.logstore import LogStore
from edgegen.gateway.metrics import GatewayMetrics
from edgegen.gateway.nodes import NodeClient
from edgegen.gateway.proxy import Proxy, Refused
from edgegen.gateway.restarts import Restarts
from edgegen.gateway.rollout import Rollouts
from edgegen.gateway.routes import admin_app
from edgegen.gateway.routes.software import MAX_WHEEL_BYTES, UPGRADE
from edgegen.gateway.settings import GatewaySettings, load_gateway_settings
from edgegen.gateway.shared import SharedFleet, shared_directory, sync_interval
from edgegen.gateway.state import GatewayState
from edgegen.gateway.upgrade import Upgrades
from edgegen.http.boundary import edge_stack
from edgegen.http.errors import error_response, render
from edgegen.http.serving import UPLOADS, GuardedHttpProtocol, tls_context
from edgegen.observe import heap
from edgegen.observe.logs import AccessLog, configure_logging, request_id
from edgegen.security.gate import open_audit

if TYPE_CHECKING:
    from edgegen.http.grpc import GrpcServer

log = logging.getLogger("edgegen.gateway")
ADMIN_PREFIXES = ("/gateway/", "/metrics", "/dashboard")
ADMIN_PATHS = ("/v2/health/live", "/v2/health/ready")


class Gateway:
    """The ASGI app: the parts built from `settings`, the entry (the edge stack), the lifespan."""

    def __init__(self, settings: GatewaySettings) -> None:
        fleet = Fleet(settings.health, settings.outlier)
        for entry in settings.nodes:
            fleet.add(entry)
        directory = shared_directory()  # one of `--workers N`: one fleet for all (shared.py)
        self.shared = shared = SharedFleet(directory, fleet) if directory is not None else None
        analyzer = Analyzer(settings.alerts)
        alerts = shared.alerts if shared is not None else analyzer.board  # (the leader's, with workers)
        metrics = GatewayMetrics(fleet, alerts)
        self.proxy = proxy = Proxy(settings, fleet, metrics)
        nodes = NodeClient(proxy.client, vouch=proxy.node_ssl is not None, key=settings.nodes_key)
        told_within_s = 2 * sync_interval(settings.health) if shared is not None else 0.0
        restarts = Restarts(fleet, nodes, settings.operations, told_within_s)
        rollouts = Rollouts(fleet, nodes.call, settings.operations)
        if shared is not None:
            rollouts.before, rollouts.lock = shared.rollbacks, shared.changes_lock()
        store = LogStore(settings.logs.path or settings.home / "logs" / "fleet.sqlite")
        advisories = settings.home / "security" / "advisories.sqlite"
        self.state = GatewayState(
            settings=settings,
            fleet=fleet,
            shared=shared,
            proxy=proxy,
            nodes=nodes,
            metrics=metrics,
            analyzer=analyzer,
            alerts=alerts,
            logs=FleetLogs(store, analyzer, settings.logs),
            restarts=restarts,
            rollouts=rollouts,
            upgrades=Upgrades(rollouts, nodes.call, restarts.drained, restarts.ready_again),
            audit=FleetAudit(fleet, nodes, advisories, metrics.vulnerable_found),
        )
        self.access_log = AccessLog(settings.access_log)
        self.admin = admin_app(self.state)
        self.entry = edge_stack(
            self._http,
            settings,
            open_audit(settings.security, settings.home),
            metrics.registry,
            metrics,
            self.access_log,
            uploads=[
                ("POST", UPLOADS, settings.operations.max_package_bytes),
                ("POST", UPGRADE, MAX_WHEEL_BYTES),
            ],
        )

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        grpc_server = None
        try:
            if self.state.settings.grpc_port:
                grpc_server = await start_grpc(self.state.settings, self.entry)
            async with background.running(self.state):
                heap.settle()  # what start-up built lives as long as the process (observe/heap.py)
                yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop()
            await self.proxy.close()
            self.access_log.flush()
            self.state.logs.close()
            if self.shared is not None:
                self.shared.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "http":
            await self.entry(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith(ADMIN_PREFIXES) or path in ADMIN_PATHS:
            await self.admin(scope, receive, send)
            return
        try:
            await self.proxy(scope, receive, send, request_id.get() or "")  # (the boundary set it)
        except Refused as refused:
            # A gone client's 499 is sent too, for the boundary's count and access line: nobody reads it.
            if refused.status != 499:
                log.info("request refused", extra={"status": refused.status, "reason": refused.message})
            headers = {"Connection": "close"} if refused.close else {}
            if refused.status == 503:  # nowhere to send it now: as a node's 503 says, try again shortly
                headers["Retry-After"] = "1"
            response = error_response(refused.message, refused.status, headers, openai=is_openai(path))
            await response(scope, receive, send)
        except EdgegenError as exc:
            # A path with two readings (400), a body over its limit (413), a client gone (499).
            status, body, headers = render(exc, is_openai(path))
            if isinstance(exc, PayloadTooLarge):
                headers["Connection"] = "close"  # the rest of the body is not read
            await Response(body, status, headers, media_type="application/json")(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        context = self.lifespan()
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await context.__aenter__()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await context.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return


async def start_grpc(settings: GatewaySettings, entry: ASGIApp) -> GrpcServer:
    """KServe v2 over gRPC on `grpc_port`, relayed through the gateway's whole stack (`entry`);
    grpc is imported only by a gateway that serves it."""
    from edgegen.gateway.grpc_relay import RPCS
    from edgegen.http.grpc import GrpcServer

    server = GrpcServer(settings, entry, RPCS)
    await server.start()
    return server


def app_from_environment() -> Gateway:
    """The uvicorn factory: settings from the file and environment the CLI set; logging as the CLI set
    it, again in each worker process (a worker is a fresh interpreter)."""
    settings = load_gateway_settings()
    configure_logging(settings.log_level)
    return Gateway(settings)


@functools.cache
def _process_settings() -> GatewaySettings:
    return load_gateway_settings()


class HttpProtocol(GuardedHttpProtocol):
    """The gateway's connections: head and body deadlines from its `[security]`."""

    load = staticmethod(_process_settings)


# uvicorn's `ssl_context_factory` for the gateway's listener.
ssl_context = functools.partial(tls_context, _process_settings)
