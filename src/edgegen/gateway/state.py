"""What the gateway's routes and loops share, built whole by the composition root (app.py) and hung on
the admin app's `app.state.gateway`; each route takes what it needs with `gateway_of(request)`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from edgegen.gateway.alerts import Analyzer, Board
from edgegen.gateway.audit import FleetAudit
from edgegen.gateway.fleet import Fleet
from edgegen.gateway.fleetlogs import FleetLogs
from edgegen.gateway.metrics import GatewayMetrics
from edgegen.gateway.nodes import NodeClient
from edgegen.gateway.proxy import Proxy
from edgegen.gateway.restarts import Restarts
from edgegen.gateway.rollout import Rollouts
from edgegen.gateway.settings import GatewaySettings
from edgegen.gateway.shared import SharedFleet
from edgegen.gateway.upgrade import Upgrades


@dataclass(frozen=True)
class GatewayState:
    settings: GatewaySettings
    fleet: Fleet  # the nodes, and which take traffic
    shared: SharedFleet | None  # with several workers: the fleet they share (shared.py)
    proxy: Proxy  # relays client requests; its pool to each node carries the gateway's own calls too
    nodes: NodeClient  # the gateway's own calls to a node
    metrics: GatewayMetrics
    analyzer: Analyzer  # alerts from the shipped access lines
    alerts: Callable[[], Board]  # the alerts, active and recent: the analyzer's, or the leader's (shared)
    logs: FleetLogs
    restarts: Restarts
    rollouts: Rollouts
    upgrades: Upgrades
    audit: FleetAudit


def gateway_of(request: Request) -> GatewayState:
    gateway: GatewayState = request.app.state.gateway
    return gateway
