"""`edgegen gateway`: the one public entry of a fleet of nodes.

    /v2/health/live, /v2/health/ready   the gateway's own (ready: some node can take traffic)
    /metrics                            the gateway's Prometheus metrics
    /gateway/audit                      every node's packages against the imported OSV advisories
    /gateway/fleet                      every node at a glance: health, routing state, load, version,
                                        models, p50/p99 and rates as the gateway saw them, last seen
    /gateway/fleet/history              each node's rates and p50/p99 over the last `history_s` (an hour)
    /gateway/logs                       POST: a node's shipped log lines; GET: search the fleet's logs
    /gateway/alerts                     error-rate spikes and latency regressions found in them
    /dashboard                          the fleet on one web page (public page; its data needs a key)
    /gateway/rollout, /gateway/rollback a model version across the fleet, node by node, health-gated
    /gateway/models/{model}/rollout     the same, for a signed package pushed in the body
    /gateway/nodes/{name}/restart       drain, restart in place, back once ready (/gateway/restart: all)
    /gateway/upgrade                    edgegen itself on the nodes (a signed wheel), node by node, gated
    /gateway/config                     GET …/{node}: a node's settings; PATCH: change them on every node
    /gateway/nodes[/{name}]             the fleet at run time: list (operator), add, re-weight, drain,
                                        remove (admin)
    everything else                     relayed to a node (proxy.py): /predict, /models/…, /v2/…, /v1/…

Every request passes the security gate first (security/gate.py: credentials, roles, rate limits,
intrusion guard). Pure ASGI in front, so a relayed request costs no framework routing; the few admin
routes are a FastAPI app behind it. Health checks run as one background task for the whole fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import pathlib
import re
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from typing import Annotated, Any, BinaryIO

import aiohttp
import orjson
from fastapi import FastAPI, Header, HTTPException, Path, Query, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from edgegen.errors import ConfigError, EdgegenError, Forbidden, InvalidInput, PayloadTooLarge, is_openai
from edgegen.gateway.alerts import Analyzer
from edgegen.gateway.balancers import Backend
from edgegen.gateway.fleet import Fleet
from edgegen.gateway.fleet import NodeState as FleetNode
from edgegen.gateway.logstore import MAX_LIMIT, LogStore, OwnLines
from edgegen.gateway.logstore import Query as LogQuery
from edgegen.gateway.proxy import Attempt, Proxy, Refused
from edgegen.gateway.rollout import NAME, GateFailed, RollbackOrder, RolloutOrder, Rollouts
from edgegen.gateway.settings import GatewaySettings, NodeEntry
from edgegen.gateway.upgrade import Upgrades, Wheel
from edgegen.http.boundary import edge_stack
from edgegen.http.errors import error_response, render
from edgegen.http.errors import install as install_error_handlers
from edgegen.http.serving import UPLOADS, GuardedHttpProtocol, tls_context
from edgegen.observe.logs import AccessLog, request_id
from edgegen.observe.metrics import LATENCY_BUCKETS, PublicView
from edgegen.security.auth import Principal, principal_of
from edgegen.security.vulns import AdvisoryDb, installed_packages

log = logging.getLogger("edgegen.gateway")
MAX_WHEEL_BYTES = 64 << 20  # an edgegen wheel is a few hundred KiB
UPGRADE = re.compile("/gateway/upgrade")


_OUTCOMES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class GatewayMetrics:
    def __init__(self, fleet: Fleet, proxy: Proxy) -> None:
        self.fleet = fleet
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.upstream = Histogram(
            "edgegen_gateway_upstream_seconds",
            "One try of a request at one node, from sending it to the last byte back.",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "edgegen_gateway_attempts_total", "Tries at a node, by outcome.", ["node", "outcome"], registry=r
        )
        self.responses = Counter(
            "edgegen_gateway_responses_total", "Responses to clients by status.", ["status"], registry=r
        )
        retries = Gauge("edgegen_gateway_retries", "Requests sent again to another node.", registry=r)
        retries.set_function(lambda: proxy.retries)
        nodes = Gauge(
            "edgegen_gateway_nodes", "Nodes in the fleet, and how many take traffic.", ["state"], registry=r
        )
        nodes.labels("known").set_function(lambda: len(fleet.nodes))
        nodes.labels("available").set_function(lambda: len(fleet.available()))
        r.register(FleetCollector(fleet))
        self.alerts = Counter("edgegen_gateway_alerts", "Alerts raised, by kind.", ["kind"], registry=r)
        self.vulnerable = Gauge(
            "edgegen_gateway_vulnerable_packages",
            "Installed packages with a known advisory, per node (at the last GET /gateway/audit).",
            ["node"],
            registry=r,
        )
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._statuses: dict[int, Any] = {}

    def attempt(self, attempt: Attempt, seconds: float) -> None:
        name = attempt.backend.name
        if attempt.error is not None:
            outcome = "error"
        else:
            assert attempt.response is not None
            outcome = _OUTCOMES[attempt.response.status // 100]
        self.fleet.record_try(attempt.backend, seconds, outcome in ("error", "5xx"))
        # Labelled children are looked up once per (node, outcome): labels() costs more than the update.
        children = self._children.get((name, outcome))
        if children is None:
            children = self._children[(name, outcome)] = (
                self.upstream.labels(name),
                self.attempts.labels(name, outcome),
            )
        children[0].observe(seconds)
        children[1].inc()

    def observe_request(self, template: str, method: str, model: str, status: int, seconds: float) -> None:
        """One answer to a client (the request boundary's count): by status."""
        child = self._statuses.get(status)
        if child is None:
            child = self._statuses[status] = self.responses.labels(str(status))
        child.inc()


class FleetCollector(Collector):
    """Per-node gauges read from the fleet at each scrape (nodes come and go at run time)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        available = GaugeMetricFamily(
            "edgegen_gateway_node_available", "1 when the node takes traffic now.", labels=["node"]
        )
        in_flight = GaugeMetricFamily(
            "edgegen_gateway_node_in_flight", "Requests at the node from this gateway now.", labels=["node"]
        )
        seen = GaugeMetricFamily(
            "edgegen_gateway_node_last_seen_seconds", "Since the node last passed a check.", labels=["node"]
        )
        taking = {b.name for b in self.fleet.available()}
        now = time.time()
        for name, state in self.fleet.nodes.items():
            available.add_metric([name], float(name in taking))
            in_flight.add_metric([name], state.backend.in_flight)
            if state.last_seen is not None:
                seen.add_metric([name], now - state.last_seen)
        yield from (available, in_flight, seen)


class AlertCollector(Collector):
    """1 for every alert active now (gateway/alerts.py)."""

    def __init__(self, analyzer: Analyzer) -> None:
        self.analyzer = analyzer

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "edgegen_gateway_alert_active", "Alerts active now.", labels=["kind", "node", "model"]
        )
        for kind, node, model in list(self.analyzer.active):
            active.add_metric([kind, node, model], 1.0)
        yield active


class ConfigOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    changes: dict[str, Any]
    nodes: list[str] | None = None


class NodeUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: int | None = Field(None, ge=1, le=1000)
    draining: bool | None = None


async def check_health(fleet: Fleet, client: aiohttp.ClientSession) -> None:
    """One round of active checks, all nodes at once."""

    async def one(name: str, url: str) -> None:
        try:
            async with client.get(f"{url}/v2/health/ready") as response:
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        fleet.record_check(name, ok)

    await asyncio.gather(*(one(name, s.backend.url) for name, s in list(fleet.nodes.items())))


async def receive(request: Request, sink: BinaryIO) -> int:
    """The request's body into `sink` (its size bounded by the request boundary: 413); refused when
    empty (400)."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        sink.write(chunk)
    if not size:
        raise HTTPException(400, "the body is empty")
    return size


def _names(nodes: str | None) -> list[str] | None:
    """`a,b` from a query string: these nodes, in this order; None: the fleet."""
    return [n for n in nodes.split(",") if n] if nodes is not None else None


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.fleet = Fleet(settings.health, settings.outlier)
        for entry in settings.nodes:
            self.fleet.add(entry)
        self.proxy = Proxy(settings, self.fleet, on_done=lambda a, s: self.metrics.attempt(a, s))
        self.metrics = GatewayMetrics(self.fleet, self.proxy)
        self.logs = LogStore(settings.logs.path or settings.home / "logs" / "fleet.sqlite")
        self._logs_lock = asyncio.Lock()  # one SQLite connection, used from worker threads in turn
        self.analyzer = Analyzer(settings.alerts, on_raise=lambda a: self.metrics.alerts.labels(a.kind).inc())
        self.metrics.registry.register(AlertCollector(self.analyzer))
        self.rollouts = Rollouts(self.fleet, self.node_call, settings.operations)
        self.upgrades = Upgrades(self.rollouts, self.node_call, self.drained, self.ready_again)
        self.access_log = AccessLog(settings.access_log)
        self.admin = self._admin_app()
        self.entry, self.gate = edge_stack(
            self._http,
            settings,
            self.metrics.registry,
            self.metrics,
            self.access_log,
            uploads=[
                ("POST", UPLOADS, settings.operations.max_package_bytes),
                ("POST", UPGRADE, MAX_WHEEL_BYTES),
            ],
        )

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=self.settings.health.timeout_s)
        connector = aiohttp.TCPConnector(ssl=self.proxy.node_ssl or True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
            loops = [
                self._health_loop(client),
                self._status_loop(),
                self._analysis_loop(),
                self._purge_loop(),
            ]
            own, level = self.settings.logs.own, logging.getLevelName(self.settings.logs.own_level.upper())
            handler = OwnLines(own, level) if own else None
            if handler is not None:
                logging.getLogger().addHandler(handler)
                loops.append(self._own_lines_loop(handler))
            tasks = [asyncio.create_task(loop) for loop in loops]
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if handler is not None:
                    logging.getLogger().removeHandler(handler)
                    await self._keep_own(handler)
                await self.proxy.close()
                self.access_log.flush()
                self.logs.close()

    async def _health_loop(self, client: aiohttp.ClientSession) -> None:
        while True:
            try:
                await check_health(self.fleet, client)
            except Exception:  # a failing check round must not end the checks
                log.exception("health check round failed")
            await asyncio.sleep(self.settings.health.interval_s)

    async def _analysis_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alerts.evaluate_s)
            try:
                self.analyzer.evaluate()
            except Exception:
                log.exception("log analysis failed")

    async def _purge_loop(self) -> None:
        while True:
            try:
                async with self._logs_lock:
                    before = time.time() - self.settings.logs.retention_s
                    dropped = await asyncio.to_thread(self.logs.purge, before)
                if dropped:
                    log.info("fleet log lines purged", extra={"count": dropped})
            except Exception:
                log.exception("fleet log purge failed")
            await asyncio.sleep(60)

    async def _own_lines_loop(self, handler: OwnLines) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._keep_own(handler)
            except Exception:
                log.exception("keeping the gateway's own log lines failed")

    async def _keep_own(self, handler: OwnLines) -> None:
        entries = handler.take()
        if entries:
            async with self._logs_lock:
                await asyncio.to_thread(self.logs.add, handler.node, handler.spool, entries)

    async def receive_logs(self, body: bytes, sender: Principal) -> dict[str, int]:
        """A node's batch of log lines: kept, then read by the analysis. A node that ships with its
        certificate (`node:<CN>`) ships its own lines only."""
        try:
            batch = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidInput("the body must be JSON: {node, spool, entries}") from None
        if not isinstance(batch, dict):
            raise InvalidInput("the body must be a JSON object: {node, spool, entries}")
        node, spool, entries = batch.get("node"), batch.get("spool"), batch.get("entries")
        if not isinstance(node, str) or not 0 < len(node) <= 128 or not node.isprintable():
            raise InvalidInput("node must be a printable name of 1 to 128 characters")
        if not isinstance(spool, str) or not 0 < len(spool) <= 64 or not spool.isalnum():
            raise InvalidInput("spool must be 1 to 64 letters and digits")
        if not isinstance(entries, list) or len(entries) > self.settings.logs.max_batch:
            raise InvalidInput(f"entries must be a list of at most {self.settings.logs.max_batch} lines")
        if sender.subject.startswith("node:") and sender.subject != f"node:{node}":
            raise Forbidden(f"the certificate of {sender.subject[5:]} ships that node's logs, not {node}'s")
        async with self._logs_lock:
            lines = await asyncio.to_thread(self.logs.add, node, spool, entries)
        self.analyzer.observe(lines)
        return {"stored": len(lines)}

    async def search_logs(self, query: LogQuery) -> list[dict[str, Any]]:
        async with self._logs_lock:
            return await asyncio.to_thread(self.logs.query, query)

    async def _status_loop(self) -> None:
        """Every node's GET /admin/status, for the fleet view: version, models, load."""
        headers = self.node_credentials()
        timeout = aiohttp.ClientTimeout(total=self.settings.health.timeout_s * 2)

        async def one(state: FleetNode) -> None:
            try:
                client = self.proxy.client(state.backend)
                async with client.get("/admin/status", headers=headers, timeout=timeout) as response:
                    if response.status != 200:
                        state.status_error = f"GET /admin/status answered {response.status}"
                        return
                    state.record_status(await response.json())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                state.status_error = f"{type(exc).__name__}: {exc}"

        while True:
            states = list(self.fleet.nodes.values())
            await asyncio.gather(*(one(state) for state in states))
            wall, now = time.time(), self.fleet.clock()
            for state in states:
                state.sample(wall, now)
            await asyncio.sleep(self.settings.health.status_interval_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "http":
            await self.entry(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith(("/gateway/", "/metrics", "/dashboard")) or path in (
            "/v2/health/live",
            "/v2/health/ready",
        ):
            await self.admin(scope, receive, send)
            return
        try:
            await self.proxy(scope, receive, send, request_id.get())
        except Refused as refused:
            # A gone client's 499 is sent too, for the boundary's count and access line: nobody reads it.
            if refused.status != 499:
                log.info("request refused", extra={"status": refused.status, "reason": refused.message})
            headers = {"Connection": "close"} if refused.close else None
            response = error_response(refused.message, refused.status, headers, openai=is_openai(path))
            await response(scope, receive, send)
        except EdgegenError as exc:  # the body cut off at its limit (413), or its client gone (499)
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

    def node_credentials(self) -> dict[str, str]:
        """What the gateway shows a node for its own calls: over mutual TLS it vouches for itself as an
        operator; otherwise the configured operator key, if any."""
        if self.proxy.node_ssl is not None:
            return {"x-edgegen-principal": Principal("gateway", "operator").to_header().decode()}
        key = self.settings.nodes_key
        return {"authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}

    async def node_call(
        self,
        state: FleetNode,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        limit_s: float = 10,
        headers: dict[str, str] | None = None,
        data: bytes | BinaryIO | None = None,
    ) -> tuple[int, Any]:
        """The gateway's own call to a node, with its node credentials: (status, JSON answer or None).
        The body is `body` as JSON, or the bytes `data`."""
        client = self.proxy.client(state.backend)
        # (the node client sends no Content-Type of its own: relayed requests carry the client's)
        kind = "application/json" if body else "application/octet-stream" if data is not None else None
        async with client.request(
            method,
            path,
            json=body,
            data=data,
            headers={
                **self.node_credentials(),
                **({"content-type": kind} if kind else {}),
                **(headers or {}),
            },
            timeout=aiohttp.ClientTimeout(total=limit_s),
        ) as response:
            try:
                return response.status, await response.json(content_type=None)
            except ValueError:
                return response.status, None

    async def config_call(
        self, name: str, method: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """A node's /admin/config (GET, or PATCH with `body`); a node that does not answer is a 502."""
        try:
            return await self.node_call(self.fleet.nodes[name], method, "/admin/config", body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = exc or type(exc).__name__
            raise HTTPException(502, f"node {name!r} cannot be reached: {reason}") from None

    async def restart_node(self, name: str) -> dict[str, Any]:
        """Drain `name` (no new requests; wait for those it has), restart it in place, wait until a new
        process of it is ready, put it back. Requests never meet it down."""
        state = self.fleet.nodes.get(name)
        if state is None:
            raise HTTPException(404, f"no node named {name!r}")
        began = time.monotonic()
        async with self.drained(state) as drained_s:
            try:
                status, before = await self.node_call(state, "GET", "/admin/status")
                if status != 200:
                    raise HTTPException(502, f"node {name!r} answered {status} to GET /admin/status")
                status, _ = await self.node_call(state, "POST", "/admin/restart")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise HTTPException(
                    502, f"node {name!r} cannot be reached: {exc or type(exc).__name__}"
                ) from None
            if status != 202:
                raise HTTPException(502, f"node {name!r} answered {status} to POST /admin/restart")
            after = await self.ready_again(state, before)
        state.record_status(after)
        log.info("node restarted", extra={"node": name, "took_s": round(time.monotonic() - began, 3)})
        return {"node": name, "drained_s": round(drained_s, 3), "took_s": round(time.monotonic() - began, 3),
                "started_before": before["started_at"], "started": after["started_at"]}  # fmt: skip

    @contextlib.asynccontextmanager
    async def drained(self, state: FleetNode) -> AsyncIterator[float]:
        """While inside: the node gets no new requests, and those it had are answered (or the drain
        timed out); gives the seconds that took."""
        name = state.backend.name
        began = time.monotonic()
        self.fleet.set_draining(name, True)
        log.info("draining node", extra={"node": name})
        try:
            while time.monotonic() - began < self.settings.operations.drain_timeout_s:
                if not state.backend.in_flight:  # every request it had is answered
                    break
                await asyncio.sleep(0.02)
            yield time.monotonic() - began
        finally:
            self.fleet.set_draining(name, False)

    async def ready_again(self, state: FleetNode, before: dict[str, Any]) -> dict[str, Any]:
        """The node's status once a process newer than `before`'s answers and is ready."""
        deadline = time.monotonic() + self.settings.operations.restart_timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            try:
                status, now = await self.node_call(state, "GET", "/admin/status", limit_s=2)
            except (aiohttp.ClientError, TimeoutError):
                continue  # between the old process and the new one
            if status == 200 and now["started_at"] > before["started_at"] and now["ready"]:
                return now  # type: ignore[no-any-return]
        raise HTTPException(504, f"node {state.backend.name!r} was not ready again in time")

    async def scan_fleet(self) -> dict[str, Any]:
        """Every node's installed packages (and the gateway's own) against the imported OSV advisories."""
        db = AdvisoryDb(self.settings.home / "security" / "advisories.sqlite")
        headers = self.node_credentials()

        async def packages(backend: Backend) -> list[tuple[str, str]]:
            async with self.proxy.client(backend).get("/admin/packages", headers=headers) as response:
                if response.status != 200:
                    raise ConfigError(f"the node answered {response.status} to GET /admin/packages")
                body = await response.json()
            return [(str(p["name"]), str(p["version"])) for p in body["packages"]]

        async def one(backend: Backend) -> dict[str, Any]:
            try:
                found = await packages(backend)
            except (aiohttp.ClientError, TimeoutError, ConfigError, KeyError, TypeError, ValueError) as exc:
                return {"error": getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"}
            return report(found)

        def report(found: list[tuple[str, str]]) -> dict[str, Any]:
            findings = db.scan(found)
            return {"packages": len(found), "vulnerable": [f.__dict__ for f in findings]}

        try:
            backends = [state.backend for state in self.fleet.nodes.values()]
            results = await asyncio.gather(*(one(b) for b in backends))
            out = {
                "gateway": report(installed_packages()),
                **{b.name: r for b, r in zip(backends, results, strict=True)},
            }
            for name, result in out.items():
                if "vulnerable" in result:
                    self.metrics.vulnerable.labels(name).set(len(result["vulnerable"]))
            return {"advisories": db.count(), "imported": db.last_import(), "nodes": out}
        finally:
            db.close()

    def _admin_app(self) -> FastAPI:
        # redirect_slashes off: its Location would be built from the client's Host header.
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
        install_error_handlers(app)  # the node's error shape: {"error": "..."}, 400 for a bad body

        async def refused_change(_request: Request, exc: Exception) -> Response:
            return error_response(str(exc), 409)  # a rollout or rollback that cannot be made

        app.add_exception_handler(GateFailed, refused_change)
        fleet, proxy = self.fleet, self.proxy

        @app.get("/v2/health/live")
        def live() -> dict[str, bool]:
            return {"live": True}

        @app.get("/v2/health/ready")
        def ready(response: Response) -> dict[str, Any]:
            available = len(fleet.available())
            if not available:
                response.status_code = 503
            return {"ready": available > 0, "nodes_available": available}

        @app.get("/metrics")
        def metrics(request: Request) -> Response:
            # An operator sees everything; anyone else the public view (observe/metrics.py).
            source, full = self.metrics.registry, principal_of(request.scope).at_least("operator")
            names = full or self.settings.security.metrics_model_names
            text = generate_latest(source if full else PublicView(source, model_names=names))
            return Response(text, media_type=CONTENT_TYPE_LATEST)

        @app.get("/gateway/audit")
        async def audit() -> dict[str, Any]:
            return await self.scan_fleet()

        @app.get("/gateway/nodes")
        def nodes() -> dict[str, Any]:
            return {"nodes": fleet.snapshot()}

        @app.post("/gateway/logs")
        async def logs_in(request: Request) -> dict[str, int]:
            return await self.receive_logs(await request.body(), principal_of(request.scope))

        @app.get("/gateway/logs")
        async def logs_out(
            node: str | None = None,
            level: str | None = None,
            since: float | None = None,
            until: float | None = None,
            request_id: str | None = None,
            text: Annotated[str | None, Query(max_length=1000)] = None,
            limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
        ) -> dict[str, Any]:
            query = LogQuery(node, level, since, until, request_id, text, limit)
            return {"lines": await self.search_logs(query)}

        @app.get("/gateway/alerts")
        def alerts() -> dict[str, Any]:
            return {
                "active": [a.view() for a in self.analyzer.active.values()],
                "recent": [a.view() for a in reversed(self.analyzer.recent)],
            }

        @app.get("/dashboard")
        def dashboard() -> Response:
            return dashboard_file("index.html")

        @app.get("/dashboard/{name}")
        def dashboard_asset(name: str) -> Response:
            if name not in ("app.js", "app.css"):
                raise HTTPException(404, "no such file")
            return dashboard_file(name)

        @app.get("/gateway/fleet/history")
        def fleet_history(since: float = 0.0) -> dict[str, Any]:
            """Each node's traffic as the fleet view showed it, every `status_interval_s`, since `since`
            (seconds since the epoch): [[time, requests/s, p50 ms, p99 ms, errors/s], …], oldest first."""
            return {
                "time": time.time(),
                "interval_s": self.settings.health.status_interval_s,
                "fields": ["time", "requests_per_s", "p50_ms", "p99_ms", "errors_per_s"],
                "nodes": {
                    name: [p for p in state.history if p[0] > since]
                    for name, state in list(fleet.nodes.items())
                },
            }

        @app.get("/gateway/fleet")
        def fleet_view() -> dict[str, Any]:
            view = fleet.view()
            return {
                "nodes": view,
                "known": len(view),
                "available": len(fleet.available()),
                "requests_per_s": round(sum(n["traffic"]["requests_per_s"] for n in view), 3),
            }

        @app.post("/gateway/nodes", status_code=201)
        def add(entry: NodeEntry) -> dict[str, object]:
            try:
                state = fleet.add(entry)
            except ConfigError as exc:
                raise HTTPException(409, exc.message) from None
            log.info("node added", extra={"node": state.backend.name, "url": entry.url})
            return state.describe(fleet.clock())

        @app.patch("/gateway/nodes/{name}")
        def update(name: str, change: NodeUpdate) -> dict[str, object]:
            if name not in fleet.nodes:
                raise HTTPException(404, f"no node named {name!r}")
            if change.weight is not None:
                fleet.set_weight(name, change.weight)
            if change.draining is not None:
                fleet.set_draining(name, change.draining)
            log.info("node changed", extra={"node": name, **change.model_dump(exclude_none=True)})
            return fleet.nodes[name].describe(fleet.clock())

        @app.post("/gateway/nodes/{name}/restart")
        async def restart_one(name: str) -> dict[str, Any]:
            return await self.restart_node(name)

        @app.get("/gateway/config/{name}")
        async def node_config(name: str) -> Any:
            state = fleet.nodes.get(name)
            if state is None:
                raise HTTPException(404, f"no node named {name!r}")
            status, answer = await self.config_call(name, "GET")
            if status != 200:
                raise HTTPException(502, f"node {name!r} answered {status}")
            return answer

        @app.patch("/gateway/config")
        async def change_config(order: ConfigOrder) -> dict[str, Any]:
            """The same change on each node in turn; a change a node refuses stops there (the others keep
            theirs: every node validates the same way, so the first refusal is the usual one)."""
            names = order.nodes if order.nodes is not None else list(fleet.nodes)
            if unknown := [n for n in names if n not in fleet.nodes]:
                raise HTTPException(404, f"unknown nodes: {', '.join(unknown)}")
            results = {}
            for name in names:
                status, answer = await self.config_call(name, "PATCH", {"changes": order.changes})
                if status != 200:
                    error = answer.get("error") if isinstance(answer, dict) else None
                    raise HTTPException(
                        status if 400 <= status < 500 else 502, f"node {name!r}: {error or status}"
                    )
                results[name] = answer
            return {"nodes": results}

        @app.post("/gateway/rollout")
        async def rollout(order: RolloutOrder) -> dict[str, Any]:
            return await self.rollouts.rollout(order)

        @app.post("/gateway/rollback")
        async def rollback(order: RollbackOrder) -> dict[str, Any]:
            return await self.rollouts.rollback(order)

        @app.post("/gateway/models/{model}/rollout")
        async def push_rollout(
            model: Annotated[str, Path(pattern=NAME)],
            request: Request,
            version: Annotated[str | None, Query(pattern=NAME)] = None,
            nodes: str | None = None,
        ) -> dict[str, Any]:
            """The body is a signed package archive (`edgegen models export`), sent to each node in turn."""
            folder = self.settings.home / "packages"
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix="push-") as spool:
                await receive(request, spool)
                spool.flush()
                # (no validation to skip: the model and version were checked above, the source is the body)
                order = RolloutOrder.model_construct(
                    model=model, version=version, url=None, nodes=_names(nodes)
                )
                return await self.rollouts.rollout(order, package=pathlib.Path(spool.name))

        @app.post("/gateway/upgrade")
        async def upgrade(
            request: Request,
            wheel: Annotated[str, Header(alias="x-edgegen-wheel", max_length=200)],
            signature: Annotated[str, Header(alias="x-edgegen-signature", max_length=1000)],
            nodes: str | None = None,
        ) -> dict[str, Any]:
            """The body is the wheel; see gateway/upgrade.py."""
            data = io.BytesIO()
            await receive(request, data)
            return await self.upgrades.upgrade(Wheel(wheel, data.getvalue(), signature), _names(nodes))

        @app.post("/gateway/restart")
        async def restart_all() -> dict[str, Any]:
            """Every node in turn, so the fleet keeps serving; a node that does not come back stops it there
            (the rest keep serving as they are), and the answer says which."""
            restarted = []
            for name in list(fleet.nodes):
                try:
                    restarted.append(await self.restart_node(name))
                except HTTPException as exc:
                    failed = {"node": name, "status": exc.status_code, "reason": exc.detail}
                    return {"ok": False, "restarted": restarted, "failed": failed}
            return {"ok": True, "restarted": restarted}

        @app.delete("/gateway/nodes/{name}")
        async def remove(name: str) -> dict[str, object]:
            if name not in fleet.nodes:
                raise HTTPException(404, f"no node named {name!r}")
            state = fleet.remove(name)
            log.info("node removed", extra={"node": name})
            await proxy.retire(state.backend)  # requests already there finish first
            return state.describe(fleet.clock())

        return app


DASHBOARD_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
                   "css": "text/css; charset=utf-8"}  # fmt: skip
# The page loads only its own script and style, and talks only to this gateway.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _dashboard_bytes(name: str) -> bytes:
    return (resources.files("edgegen.gateway") / "dashboard" / name).read_bytes()


def dashboard_file(name: str) -> Response:
    media_type = DASHBOARD_TYPES[name.rsplit(".", 1)[1]]
    return Response(_dashboard_bytes(name), media_type=media_type, headers=DASHBOARD_HEADERS)


def app_from_environment() -> Gateway:
    """The uvicorn factory: settings from the file and environment the CLI set."""
    from edgegen.gateway.settings import load_gateway_settings

    return Gateway(load_gateway_settings())


@functools.cache
def _process_settings() -> GatewaySettings:
    from edgegen.gateway.settings import load_gateway_settings

    return load_gateway_settings()


class HttpProtocol(GuardedHttpProtocol):
    """The gateway's connections: head and body deadlines from its `[security]`."""

    load = staticmethod(_process_settings)


# uvicorn's `ssl_context_factory` for the gateway's listener.
ssl_context = functools.partial(tls_context, _process_settings)
