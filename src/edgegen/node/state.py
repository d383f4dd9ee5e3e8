"""What the routes of one node share, hung on `app.state.node`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.requests import Request

from edgegen.cache import ResponseCache
from edgegen.cache.keys import decode_tensors, encode_tensors, tensors_key
from edgegen.config import Settings
from edgegen.engine.registry import ModelRegistry, ServedModel
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
    metrics: NodeMetrics
    access_log: AccessLog
    audit: AuditLog | None = None
    packages: list[tuple[str, str]] | None = None  # installed distributions, read on first request
    jobs: JobQueue | None = None
    job_workers: JobWorkers | None = None  # set once the models are loaded
    cache: ResponseCache | None = None
    started: float = field(default_factory=time.monotonic)
    in_flight: Callable[[], int] = lambda: 0  # requests being answered now (the app sets it)

    async def infer(
        self, scope: Mapping[str, Any], served: ServedModel, feeds: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """A fixed-shape model's outputs for `feeds` — from the response cache when it has them — and
        the headers that say where they came from."""
        batcher = served.fixed_shape()
        cache = self.cache
        ticket = None
        if cache is not None:

            def key(owner: str, model: str, tag: str) -> bytes:
                return tensors_key(owner, model, tag, feeds)

            ticket = cache.ticket(scope, served.manifest, key, deterministic=True)
            if ticket is not None and (cached := cache.lookup(ticket)) is not None:
                return decode_tensors(cached), ticket.headers
        outputs = await batcher.submit(feeds, self.settings.request_timeout_s)
        if cache is None or ticket is None:
            return outputs, {}
        cache.store(ticket, encode_tensors(outputs))
        return outputs, ticket.headers


def node_of(request: Request) -> NodeState:
    node: NodeState = request.app.state.node
    return node
