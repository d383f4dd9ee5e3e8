"""The node's ASGI app factory.

create_app(settings)   the app for one process; `edgegen serve` runs it under uvicorn
app_from_environment() the factory uvicorn calls in each worker process (settings from EDGEGEN_*)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from edgegen.cache import ResponseCache
from edgegen.config import Settings, load_settings
from edgegen.engine.registry import ModelRegistry
from edgegen.engine.service import InferenceService
from edgegen.http import errors, serving
from edgegen.http.boundary import InFlight, edge_stack
from edgegen.http.serving import UPLOADS, GuardedHttpProtocol, tls_context
from edgegen.jobs.queue import Job, JobQueue
from edgegen.jobs.sqlite import SqliteJobQueue
from edgegen.jobs.workers import JobWorkers
from edgegen.node import admin, jobs_api, openai, predict, remote_config, software, v2
from edgegen.node.jobs_api import run_job
from edgegen.node.state import NodeState, node_of
from edgegen.observe import heap
from edgegen.observe.logs import AccessLog, configure_logging
from edgegen.observe.metrics import CONTENT_TYPE, NodeMetrics
from edgegen.security.atrest import Keyring
from edgegen.security.auth import principal_of
from edgegen.security.gate import open_audit
from edgegen.security.keys import KeyStore
from edgegen.security.signing import store_trust
from edgegen.store import Manifest, ModelStore

if TYPE_CHECKING:
    from edgegen.http.grpc import GrpcServer
    from edgegen.observe.shipping import LogShipper

log = logging.getLogger("edgegen.node")
# The schema's `info.version` is the HTTP API's, never the software's: which edgegen (and so which of its
# known flaws) a node runs is an operator's business (GET /admin/status), not every user's.
API_VERSION = "1"


class NodeApp:
    """The ASGI entry of a node; `state` is the FastAPI app's, so `app.state.node` works on both."""

    def __init__(self, api: FastAPI, node: NodeState) -> None:
        self.api = api
        self.state = api.state
        settings = node.settings
        # The hot routes before the FastAPI app: the seed's two, and KServe's inference.
        routes: ASGIApp = predict.PredictRoutes(v2.InferRoutes(api, node), node)
        if settings.grpc_port:
            from edgegen.node.grpc_server import GrpcCalls

            routes = GrpcCalls(routes, node)  # gRPC calls, past the gate (node/grpc_server.py)
        self._entry = edge_stack(
            routes,
            settings,
            node.audit,
            node.metrics.registry,
            node.metrics,
            node.access_log,
            uploads=[("PUT", UPLOADS, settings.security.max_pull_bytes)],
            in_flight=node.in_flight,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)


def create_app(settings: Settings) -> NodeApp:
    metrics = NodeMetrics(settings.home)
    keyring = Keyring.load(settings.security.encryption_key_file)
    store = ModelStore(settings.store_dir, trust=store_trust(settings), keyring=keyring)
    cache = ResponseCache(settings, keyring, metrics) if settings.cache.enabled else None

    def swapped(name: str, manifest: Manifest | None) -> None:
        if cache is not None:
            cache.invalidate(name, manifest)  # its other versions' answers go
        metrics.on_served(name, manifest is not None, len(registry.names()))

    registry = ModelRegistry(store, settings, observer=metrics, generation_observer=metrics, on_swap=swapped)
    access_log = AccessLog(settings.access_log and settings.log_level in ("debug", "info"))
    service = InferenceService(
        registry,
        cache,
        request_timeout_s=settings.request_timeout_s,
        generation_timeout_s=settings.llm.timeout_s,
    )
    in_flight = InFlight()
    queue = open_queue(settings, keyring)
    workers = job_workers(settings, queue, service, in_flight, metrics) if settings.jobs.workers else None
    node = NodeState(
        settings=settings, store=store, registry=registry, service=service, metrics=metrics,
        access_log=access_log, audit=open_audit(settings.security, settings.home), in_flight=in_flight,
        jobs=queue, job_workers=workers, cache=cache,
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Models load in the background: /v2/health/live answers at once, /ready once they are in.
        async def load() -> None:
            await registry.refresh()
            heap.settle()  # what start-up allocated lives as long as the process (observe/heap.py)
            log.info("node ready", extra={"models": registry.names(), "ready": registry.ready})
            if workers is not None:  # once the models are in, not before
                await workers.start()
            if settings.store_poll_s > 0:
                await asyncio.gather(
                    registry.watch(settings.store_poll_s),
                    remote_config.watch(settings, settings.store_poll_s),
                )

        shipper = start_shipping(settings, access_log)
        grpc_server = await start_grpc(settings, node_app) if settings.grpc_port else None
        loader = asyncio.create_task(load(), name="model-loader")
        purger = asyncio.create_task(purge_jobs(node.jobs, settings.jobs.retention_s), name="job-purger")
        multiprocess = metrics.multiprocess
        trial = asyncio.create_task(
            software.watch_trial(
                settings.home,
                serving.top_pid(multiprocess),
                functools.partial(serving.request_exit, multiprocess),
            ),
            name="software-trial",
        )
        try:
            yield
        finally:
            for task in (loader, purger, trial):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if workers is not None:
                await workers.stop()
            if node.jobs is not None:
                await node.jobs.close()
            if grpc_server is not None:
                await grpc_server.stop()
            await registry.close()
            if cache is not None:
                cache.close()
            access_log.flush()
            if shipper is not None:
                stop_shipping(shipper)

    app = FastAPI(
        title="edgegen node",
        version=API_VERSION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        # No `/x/` → `/x` redirects: Starlette builds their Location from the Host header, which a
        # client chooses (and, behind the gateway, names the node's internal address).
        redirect_slashes=False,
    )
    app.state.node = node
    errors.install(app)
    app.include_router(v2.router)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(jobs_api.router)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics_route(request: Request) -> Response:
        node = node_of(request)
        if node.jobs is not None:
            try:
                counts = await node.jobs.counts()
            except Exception:  # a queue that cannot answer (Redis away) leaves the last counts
                log.warning("job counts unavailable for /metrics", exc_info=True)
            else:
                node.metrics.on_jobs(counts)
        # An operator sees everything; anyone else the public view (observe/metrics.py).
        full = principal_of(request.scope).at_least("operator")
        model_names = full or node.settings.security.metrics_model_names
        return Response(node.metrics.render(full=full, model_names=model_names), media_type=CONTENT_TYPE)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema["paths"] = {**predict.OPENAPI_PATHS, **v2.OPENAPI_PATHS, **schema["paths"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    node_app = NodeApp(app, node)
    return node_app


async def start_grpc(settings: Settings, entry: ASGIApp) -> GrpcServer:
    """KServe v2 over gRPC on `grpc_port`, through the node's whole stack (`entry`); grpc is imported only
    by a node that serves it."""
    from edgegen.http.grpc import GrpcServer
    from edgegen.node.grpc_server import RPCS

    server = GrpcServer(settings, entry, RPCS)
    await server.start()
    return server


def job_workers(
    settings: Settings, queue: JobQueue, service: InferenceService, in_flight: InFlight, observer: NodeMetrics
) -> JobWorkers:
    """The workers that run queued jobs through `service`, giving way while live requests are in flight."""
    keys = KeyStore(settings.keys_file) if settings.security.auth else None  # looked up again per job

    async def run(job: Job) -> tuple[int, bytes]:
        return await run_job(service, keys, settings, job)

    return JobWorkers(queue, run, settings.jobs, in_flight, worker_name(), observer=observer)


def open_queue(settings: Settings, keyring: Keyring | None) -> JobQueue:
    s = settings.jobs
    if s.backend == "redis":
        from edgegen.jobs.redis import RedisJobQueue

        return RedisJobQueue(
            s.redis_url.get_secret_value(),
            max_attempts=s.max_attempts,
            backoff_s=s.backoff_s,
            keyring=keyring,
            max_queued=s.max_queued_per_tenant,
            max_queued_bytes=s.max_queued_bytes_per_tenant,
        )
    return SqliteJobQueue(
        s.path or settings.home / "jobs" / "jobs.sqlite",
        max_attempts=s.max_attempts,
        backoff_s=s.backoff_s,
        keyring=keyring,
        max_queued=s.max_queued_per_tenant,
        max_queued_bytes=s.max_queued_bytes_per_tenant,
    )


def start_shipping(settings: Settings, access_log: AccessLog) -> LogShipper | None:
    """With `[logs] ship_to`, this process's log lines (and access lines) go to the gateway too."""
    s = settings.logs
    if s.ship_to is None:
        return None
    from edgegen.observe.shipping import LogShipper, ShipHandler, default_node_name

    headers = {"authorization": f"Bearer {s.key.get_secret_value()}"} if s.key is not None else {}
    context: ssl.SSLContext | None = None
    if s.ca_file is not None or s.cert_file is not None:
        context = ssl.create_default_context(cafile=s.ca_file)
        if s.cert_file is not None:  # the node's certificate speaks for it: no key on the node
            context.load_cert_chain(s.cert_file, s.key_file)
    shipper = LogShipper(
        s.ship_to, s.node or default_node_name(settings.port), settings.home / "logs" / "spool.sqlite",
        headers=headers, context=context, interval_s=s.interval_s, batch=s.batch, spool_bytes=s.spool_bytes,
    )  # fmt: skip
    logging.getLogger().addHandler(ShipHandler(shipper, logging.getLevelName(s.level.upper())))
    if s.access:
        access_log.sinks.append(shipper.add)
    shipper.start()
    return shipper


def stop_shipping(shipper: LogShipper) -> None:
    from edgegen.observe.shipping import ShipHandler

    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ShipHandler) and h.shipper is shipper]:
        root.removeHandler(handler)
    shipper.stop()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def purge_jobs(queue: JobQueue | None, retention_s: float) -> None:
    """Finished jobs are kept `retention_s`, then dropped (checked every minute)."""
    while queue is not None:
        try:
            dropped = await queue.purge(time.time() - retention_s)
            if dropped:
                log.info("jobs purged", extra={"count": dropped})
        except Exception:
            log.exception("job purge failed")
        await asyncio.sleep(60)


def app_from_environment() -> NodeApp:
    settings = load_settings()
    configure_logging(settings.log_level)
    return create_app(settings)


@functools.cache
def _process_settings() -> Settings:
    return load_settings()


class HttpProtocol(GuardedHttpProtocol):
    """The node's connections: head and body deadlines from its `[security]`."""

    load = staticmethod(_process_settings)


# uvicorn's `ssl_context_factory` for a node: TLS from the settings (in every worker process).
ssl_context = functools.partial(tls_context, _process_settings)
