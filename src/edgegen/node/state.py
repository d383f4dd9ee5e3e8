"""What the routes of one node share, hung on `app.state.node`; built whole by node/app.py's create_app."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request

from edgegen.cache import ResponseCache
from edgegen.config import Settings
from edgegen.engine.registry import ModelRegistry
from edgegen.engine.service import InferenceService
from edgegen.http.boundary import InFlight
from edgegen.jobs.queue import JobQueue
from edgegen.jobs.workers import JobWorkers
from edgegen.observe.logs import AccessLog
from edgegen.observe.metrics import NodeMetrics
from edgegen.security.audit import AuditLog
from edgegen.store import ModelStore


@dataclass
class NodeState:
    settings: Settings
    store: ModelStore
    registry: ModelRegistry
    service: InferenceService  # the one way from a route to a model (engine/service.py)
    metrics: NodeMetrics
    access_log: AccessLog
    audit: AuditLog  # the security gate's, where admin changes are written
    in_flight: InFlight  # requests being answered now (the request boundary counts them)
    jobs: JobQueue | None = None
    job_workers: JobWorkers | None = None  # started once the models are loaded
    cache: ResponseCache | None = None
    packages: list[tuple[str, str]] | None = None  # installed distributions, read on first request
    started: float = field(default_factory=time.monotonic)


def node_of(request: Request) -> NodeState:
    node: NodeState = request.app.state.node
    return node
