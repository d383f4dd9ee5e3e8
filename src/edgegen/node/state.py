"""What the routes of one node share, hung on `app.state.node`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from edgegen.cache import ResponseCache
from edgegen.config import Settings
from edgegen.engine.registry import ModelRegistry
from edgegen.engine.service import InferenceService
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
    audit: AuditLog | None = None
    packages: list[tuple[str, str]] | None = None  # installed distributions, read on first request
    jobs: JobQueue | None = None
    job_workers: JobWorkers | None = None  # set once the models are loaded
    cache: ResponseCache | None = None
    started: float = field(default_factory=time.monotonic)
    in_flight: Callable[[], int] = lambda: 0  # requests being answered now (the app sets it)


def node_of(request: Request) -> NodeState:
    node: NodeState = request.app.state.node
    return node
