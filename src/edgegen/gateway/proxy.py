"""Forward one request to a node and its answer back: balancing, retries, header hygiene, streams.

    client ─▶ (head and body size checked by http.boundary) ─▶ read the body
           ─▶ balancer for the model / route ─▶ node (upstream.py: one keep-alive pool per node)
           ◀─ status + headers, then the body relayed chunk by chunk (SSE token by token)

Retries. A request that never reached a node (connect error, connect timeout) is tried on another
node. An idempotent prediction (`/predict`, `/models/*/predict`, `/v2/models/*/infer`, GET) is also
retried when its node failed before answering (connection dropped, 502/503/504). Never after the first
byte went to the client. Each retry spends one token of a budget that every request refills by
`budget_ratio` (capped at `budget_min`), so a failing fleet cannot triple its own load.

A node that dies mid-stream: an SSE stream gets a last `data: {"error": …}` event and ends; any
other body is cut off (the client sees a short read, never a silently truncated success). A client
that disconnects while its request is at a node cancels it there: the gateway stops, closes that
connection (the node cancels the generation, as for a client of its own) and releases the node.

Where a request goes, which model it names and what it sticks to are read once, before any node sees
it (target.py): the node's URL is built from parts, never from anything the client sent, and a node's
redirect is relayed with a relative `Location`.

What counts against a node (passive ejection, fleet.py): it did not answer (connect error, timeout,
dropped connection) or answered 502/504. A 500 is an answer — the node is up, and the request's
content caused it, which a hostile client could repeat on every node — so it is counted as an error
in the traffic views and alerts, never as the node failing; a 503 is backpressure.

Jobs. A job lives in the queue of the node that accepted it (SQLite), or in one all nodes share
(Redis). The gateway remembers which node answered each `POST /v1/jobs` and sends `GET`/`DELETE
/v1/jobs/{id}` there; a job it has not seen (the gateway restarted, the job went to a node directly)
is looked for on each available node in turn. A job whose node is unavailable is a 503, not a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson
from starlette.types import Message, Receive, Scope, Send

from edgegen.gateway.balancers import Backend, Balancer, PrefixAffinity, make_balancer
from edgegen.gateway.fleet import Fleet
from edgegen.gateway.settings import GatewaySettings, RetrySettings
from edgegen.gateway.target import Target, affinity_key, json_body, model_of, relative_location
from edgegen.gateway.upstream import Connection, NodeFailed, NodePool, NodeUnreached
from edgegen.http.bodies import read_body
from edgegen.observe import tracing
from edgegen.security.auth import GENERATION_PATHS, Principal
from edgegen.security.transport import client_context

log = logging.getLogger("edgegen.gateway")

# Hop-by-hop headers (RFC 9110 §7.6.1) and what the proxy sets itself: never copied across. `Expect`
# too: the gateway read the whole body already, and a node's `100 Continue` would be an answer too many.
_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
     b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect"}
)  # fmt: skip
# A client must not choose what the gateway tells a node about the client (or, later, who it is).
_CLIENT_FORBIDDEN = (b"x-forwarded-", b"forwarded", b"x-real-ip", b"x-edgegen-")
_HOP_ID = _HOP | {b"x-request-id"}
# What of the client's headers a node never gets, by (the gateway vouches for the caller: its credential
# stays here; the gateway sends a `traceparent` of its own): made once, not per request.
_SKIP = {
    (vouched, traced): _HOP_ID.union([b"authorization"] * vouched, [b"traceparent"] * traced)
    for vouched in (False, True)
    for traced in (False, True)
}
# The body is relayed as it came, so its length holds; the gateway's server writes its own Date, and
# its request boundary the request id (the one it forwarded, which the node echoes).
_HOP_RESPONSE = (_HOP - {b"content-length"}) | {b"date", b"x-request-id"}
_IDEMPOTENT = re.compile(r"^/(predict|models/[^/]+/predict|v2/models/[^/]+(/versions/[^/]+)?/infer)$")
_RETRY_STATUS = frozenset({502, 503, 504})
_NODE_FAILED = frozenset({502, 504})  # answers that say the node, not the request, is at fault
_JOB = re.compile(r"^/v1/jobs/([^/]+)$")
JOBS_REMEMBERED = 100_000  # job -> node entries kept (~150 bytes each); older ones are looked for again
WHOLE_BODY_BYTES = 1 << 20  # answers up to this size are read whole and relayed in one send


class Refused(Exception):
    """A request the gateway answers itself (status, message), before any node sees it."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close  # answer with Connection: close (the request's framing is not trusted)


class RetryBudget:
    """Retries allowed: each request adds `ratio` of one, up to `cap`; a retry spends one."""

    def __init__(self, settings: RetrySettings) -> None:
        self.ratio = settings.budget_ratio
        self.cap = max(settings.budget_min, 1.0)
        self.tokens = self.cap

    def deposit(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class Attempt:
    """What happened to one try of a request at one node."""

    backend: Backend
    started: float
    response: Connection | None = None  # the node's answer, read through its connection
    body: bytes | None = None  # the whole body, when it was small enough to read before relaying
    error: str | None = None
    reached: bool = True  # False: the node never saw the request
    gone: bool = False  # the client left (or the gateway stopped) while this try was on
    finished: bool = False  # the node was released and the try reported


class ProxyObserver(Protocol):
    """What counts the proxy's work (gateway/metrics.py), so the proxy never imports Prometheus."""

    def attempt(self, attempt: Attempt, seconds: float) -> None:
        """One try at one node, finished: `seconds` from sending it to its last byte (or failure)."""

    def retried(self) -> None:
        """A request sent again, to another node."""


class ClientWatch:
    """The client's side of one relayed request. `send` passes messages on and notes when the answer
    went whole; `run(work)` cancels `work` when the client disconnects before that. A server tells of a
    disconnect only through `receive()` (uvicorn's `send` to a gone client returns quietly), so without
    this a stream would be read from its node to its end for nobody."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        self.complete = False

    async def send(self, message: Message) -> None:
        await self._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True

    async def _gone(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if self.complete:  # the server's end of an answer sent whole, not the client leaving
            await asyncio.Future()

    async def run(self, work: Coroutine[Any, Any, int]) -> int:
        """`work`'s result, or Refused(499) once the client left and `work` was cancelled (its
        clean-up, closing the node's connection, done)."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self._gone())
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, watch, return_exceptions=True)
        if task.cancelled():
            raise Refused(499, "the client went away")
        return task.result()


class JobHomes:
    """Which node holds which job, most recent first, bounded."""

    def __init__(self, capacity: int = JOBS_REMEMBERED) -> None:
        self.capacity = capacity
        self._homes: OrderedDict[str, str] = OrderedDict()

    def remember(self, job_id: str, node: str) -> None:
        self._homes[job_id] = node
        self._homes.move_to_end(job_id)
        if len(self._homes) > self.capacity:
            self._homes.popitem(last=False)

    def get(self, job_id: str) -> str | None:
        return self._homes.get(job_id)


class Proxy:
    def __init__(self, settings: GatewaySettings, fleet: Fleet, observer: ProxyObserver) -> None:
        self.settings = settings
        self.fleet = fleet
        self.observer = observer
        self.budget = RetryBudget(settings.retry)
        self._balancers: dict[str, Balancer] = {}
        # A job submission that names an Idempotency-Key goes where the key lives on this ring, whatever
        # the balancer: each node (its own SQLite queue) knows only the keys it was sent, and a client
        # sends the key again exactly when it is unsure the first try got through.
        self._submissions = PrefixAffinity()
        self._pools: dict[str, NodePool] = {}  # relayed requests
        self._clients: dict[str, tuple[str, aiohttp.ClientSession]] = {}  # the gateway's own calls
        self._retiring: dict[Backend, aiohttp.ClientSession] = {}
        self._routes = sorted(settings.balancer.routes.items(), key=lambda kv: -len(kv[0]))
        self.node_ssl = node_ssl_context(settings)
        self.job_homes = JobHomes()

    def pool(self, backend: Backend) -> NodePool:
        pool = self._pools.get(backend.name)
        if pool is None or pool.url != backend.url:
            s = self.settings
            pool = self._pools[backend.name] = NodePool(
                backend.url, self.node_ssl, s.max_connections_per_node, s.connect_timeout_s, s.read_timeout_s
            )
        return pool

    def client(self, backend: Backend) -> aiohttp.ClientSession:
        """An aiohttp session to the node, for the gateway's own calls (nodes.py)."""
        known = self._clients.get(backend.name)
        if known is None or known[0] != backend.url:
            s = self.settings
            connector = aiohttp.TCPConnector(
                limit=s.max_connections_per_node, keepalive_timeout=30, ssl=self.node_ssl or True
            )
            timeout = aiohttp.ClientTimeout(connect=s.connect_timeout_s, sock_read=s.read_timeout_s)
            session = aiohttp.ClientSession(
                base_url=backend.url,
                connector=connector,
                timeout=timeout,
                auto_decompress=False,  # bytes are relayed as the node sent them
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
            known = self._clients[backend.name] = (backend.url, session)
        return known[1]

    async def retire(self, backend: Backend) -> None:
        """A node left the fleet: close its connections once the requests still there are done."""
        pool = self._pools.pop(backend.name, None)
        if pool is not None:
            pool.close()
        known = self._clients.pop(backend.name, None)
        if known is None:
            return
        if backend.in_flight:
            self._retiring[backend] = known[1]
        else:
            await known[1].close()

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        for session in [*(s for _, s in self._clients.values()), *self._retiring.values()]:
            await session.close()
        self._clients.clear()
        self._retiring.clear()

    def balancer_for(self, path: str, model: str | None) -> Balancer:
        cfg = self.settings.balancer
        if model and model in cfg.models:
            name = cfg.models[model]
        else:
            name = cfg.default
            for prefix, routed in self._routes:  # (a loop, not next() over a generator: 1 % of a relay's CPU)
                if path.startswith(prefix):
                    name = routed
                    break
        balancer = self._balancers.get(name)
        if balancer is None:
            balancer = self._balancers[name] = make_balancer(name)
        return balancer

    # -- the request --------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> int:
        """Relay one request (its head already checked by the app); return the status the client got.
        A client that leaves while its generation is at a node cancels it there (499)."""
        body = await read_body(receive)
        target = Target.of(scope)
        if target.path not in GENERATION_PATHS:
            # Anything else is answered within the node's request deadline: watching for its client's
            # departure would cost two tasks a request on the hot path and spare the node nothing.
            return await self._forward(scope, target, body, send, request_id)
        client = ClientWatch(receive, send)
        return await client.run(self._forward(scope, target, body, client.send, request_id))

    async def _forward(self, scope: Scope, target: Target, body: bytes, send: Send, request_id: str) -> int:
        path, method = target.path, scope["method"]
        relay, traceparent = tracer.relay() if (tracer := tracing.tracer) is not None else (None, None)
        vouch = self.node_ssl is not None
        forward, session = self._forward_headers(scope, request_id, vouch=vouch, traceparent=traceparent)
        tried: set[str] = set()
        attempt: Attempt | None = None
        try:
            if method in ("GET", "DELETE") and (job := _JOB.match(path)):
                return await self._job(job.group(1), method, target, forward, send)
            idempotent = method in ("GET", "HEAD") or bool(_IDEMPOTENT.match(path))
            request = json_body(path, body)
            model = model_of(path, request)
            principal: Principal | None = scope.get("edgegen.principal")
            if model is not None and principal is not None and not principal.allows_model(model):
                # The gate refused a model named in the path already; one named in the body is decided
                # here, before any node sees the request (the node refuses it too: a second wall).
                raise Refused(403, f"this credential may not use model {model!r}")
            balancer = self.balancer_for(path, model)
            key = affinity_key(session, request) if balancer.name == "prefix_affinity" else None
            once = _submission_key(scope) if method == "POST" and path == "/v1/jobs" else None
            self.budget.deposit()
            for number in range(self.settings.retry.attempts):
                if number:
                    if not self.budget.withdraw():
                        break
                    self.observer.retried()
                    log.info(
                        "retrying on another node", extra={"node": attempt.backend.name if attempt else None}
                    )
                available = self.fleet.available()
                if not available:
                    if attempt is None or attempt.response is None:
                        raise Refused(503, "no node is available to take this request")
                    break  # nowhere else to go: the node's own 502/503/504 is the answer
                nodes = ([n for n in available if n.name not in tried] or available) if tried else available
                backend = balancer.pick(nodes, key) if once is None else self._submissions.home(nodes, once)
                tried.add(backend.name)
                if attempt is not None:
                    await self._finish(attempt)  # a 502/503/504 we will not pass on
                attempt = await self._try(backend, method, target, forward, body)
                response = attempt.response
                if response is not None and not (idempotent and response.status in _RETRY_STATUS):
                    break
                # Here: no answer, or an idempotent request's 502/503/504. Only what never reached a node
                # is safe to send again when the request is not idempotent.
                if response is None and attempt.reached and not idempotent:
                    break
            assert attempt is not None
            if attempt.response is None:
                raise Refused(502, f"the node failed to answer ({attempt.error})")
            status = attempt.response.status
            if method == "POST" and path == "/v1/jobs" and attempt.body and status in (200, 202):
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
                    self.job_homes.remember(str(orjson.loads(attempt.body)["id"]), attempt.backend.name)
            return await self._relay(attempt, send)
        finally:
            if attempt is not None:
                await self._finish(attempt)  # whatever ended the request, the node is released (once)
            if relay is not None:
                relay.set_attribute("edgegen.tries", len(tried))
                if attempt is not None:
                    relay.set_attribute("edgegen.node", attempt.backend.name)
                relay.end()

    async def _job(
        self, job_id: str, method: str, target: Target, forward: list[tuple[bytes, bytes]], send: Send
    ) -> int:
        """A job's state or cancellation, from the node that holds it: the one known to (first), else any
        that has it — nodes sharing a Redis queue all do. Their 404 is the answer only when every node of
        the fleet was asked: one out of rotation (down, draining, ejected) may hold the job, which is then
        a 503 to retry, not a job lost (this worker may not know where it went: each of `--workers N`
        knows the submissions it relayed)."""
        available = self.fleet.available()
        home = self.job_homes.get(job_id)
        names = {b.name for b in available}
        away = [name for name in list(self.fleet.nodes) if name not in names]
        candidates = sorted(available, key=lambda b: b.name != home)  # the known node first
        silent: list[str] = []
        for backend in candidates:
            attempt = await self._try(backend, method, target, forward, b"")
            response = attempt.response
            if response is None:
                silent.append(backend.name)
                continue
            if response.status == 404 and (backend is not candidates[-1] or silent or away):
                await self._finish(attempt)
                continue
            if response.status != 404:
                self.job_homes.remember(job_id, backend.name)
            return await self._relay(attempt, send)
        if home in away:
            raise Refused(503, f"node {home!r}, which holds job {job_id}, is unavailable; retry later")
        if silent or away:
            missing = len(silent) + len(away)
            raise Refused(
                503, f"job {job_id} is not on the nodes that answered; {missing} could not be asked"
            )
        raise Refused(503, "no node is available to take this request")

    @staticmethod
    def _forward_headers(
        scope: Scope, request_id: str, vouch: bool = False, traceparent: bytes | None = None
    ) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """The headers a node gets (the client's, less hop-by-hop and forwarding ones, plus the gateway's
        own), built once per request; and the client's `X-Session-Id`, if any. The caller the gateway
        authenticated always travels as `X-Edgegen-Principal` (a node with authentication off narrows
        to it: its scopes and tenant hold there); with `vouch` (mutual TLS to the node) instead of the
        client's credential, which then never leaves the gateway. `X-Forwarded-For` names the client the
        security gate counted the request against (security/gate.py). A `traceparent` (the relay's span,
        tracing on) replaces the client's; without one the client's goes on as it came."""
        fields: list[tuple[bytes, bytes]] = []
        host = session = None
        principal: Principal | None = scope.get("edgegen.principal")
        skip = _SKIP[vouch and principal is not None, traceparent is not None]
        for key, value in scope["headers"]:
            if key == b"host":
                host = value
            elif key == b"x-session-id":
                session = value
            if key not in skip and not key.startswith(_CLIENT_FORBIDDEN):
                fields.append((key, value))
        if principal is not None:
            fields.append((b"x-edgegen-principal", principal.to_header()))
        client = scope.get("edgegen.client") or (scope["client"][0] if scope.get("client") else "unknown")
        fields.append((b"x-forwarded-for", client.encode("latin-1")))
        fields.append((b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")))
        if host is not None:
            fields.append((b"x-forwarded-host", host))
        fields.append((b"x-request-id", request_id.encode("latin-1")))
        if traceparent is not None:
            fields.append((b"traceparent", traceparent))
        return fields, session

    async def _try(
        self, backend: Backend, method: str, target: Target, fields: list[tuple[bytes, bytes]], body: bytes
    ) -> Attempt:
        """Send the request and wait for the node's status and headers; a small body is read too. An
        attempt comes back without a response finished already (the node released); one with a response
        is the caller's to relay or finish."""
        attempt = Attempt(backend, started=time.perf_counter())
        backend.acquire()
        try:
            pool = self.pool(backend)
            response = attempt.response = await pool.request(
                method.encode("latin-1"), target.request_target(), fields, body
            )
            backend.observe(time.perf_counter() - attempt.started)  # time to headers
            length = response.content_length
            small = length is not None and length <= WHOLE_BODY_BYTES
            if small and response.content_type != b"text/event-stream":
                # A small body of known length (every prediction) is read here, before anything goes to
                # the client: a node that dies while sending it is a failed try, which a retry can fix.
                attempt.body = await response.read()
        except NodeUnreached as exc:
            attempt.error, attempt.reached = str(exc), False
        except NodeFailed as exc:
            # It reached the node, which failed to answer or to send its body whole.
            reading = " while reading the body" if attempt.response is not None else ""
            attempt.error = str(exc) + reading
        except BaseException:
            # Cancelled (the client left, the gateway stops) or a fault of the gateway's own: released
            # all the same, and nothing held against the node.
            attempt.gone = True
            await self._finish(attempt)
            raise
        if attempt.error is not None:
            await self._finish(attempt)
            attempt.response = None
        return attempt

    async def _finish(self, attempt: Attempt) -> None:
        """Close the attempt, once (later calls do nothing): release the node, tell the fleet whether the
        node failed (module docstring: no answer, 502, 504; a client that left tells nothing), report."""
        if attempt.finished:
            return
        attempt.finished = True
        backend = attempt.backend
        backend.release()
        response = attempt.response
        if attempt.error is not None or (response is not None and response.status in _NODE_FAILED):
            self.fleet.record_failure(backend)
        elif not attempt.gone:
            self.fleet.record_success(backend)
        if response is not None:
            response.release()  # back to the pool when read whole; closed otherwise (upstream.py)
        if response is not None or attempt.error is not None:  # (left before any answer: nothing to time)
            self.observer.attempt(attempt, time.perf_counter() - attempt.started)
        if not backend.in_flight and backend in self._retiring:
            await self._retiring.pop(backend).close()

    async def _relay(self, attempt: Attempt, send: Send) -> int:
        response, backend = attempt.response, attempt.backend
        assert response is not None
        headers = [
            (key, relative_location(value) if key == b"location" else value)
            for key, value in response.headers
            if key not in _HOP_RESPONSE
        ]
        headers.append((b"x-edgegen-node", backend.name.encode()))
        streaming = response.content_type == b"text/event-stream"
        try:
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            if attempt.body is not None:  # read whole by `_try`: one piece
                await send({"type": "http.response.body", "body": attempt.body, "more_body": False})
                return response.status
            try:
                async for chunk in response.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except NodeFailed as exc:
                attempt.error = f"{exc} after the response started"
                if not streaming:
                    raise  # the client sees a cut-off body, never a short one that looks complete
                log.warning("a node failed mid-stream", extra={"node": backend.name})
                event = {"error": {"message": "the node serving this stream failed", "type": "upstream"}}
                await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(event) + b"\n\n",
                            "more_body": True})  # fmt: skip
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            attempt.gone = True  # the client left: `_finish` closes the node's connection
            raise
        finally:
            await self._finish(attempt)
        return response.status


def _submission_key(scope: Scope) -> bytes | None:
    """A job submission's Idempotency-Key, with whose it is (a node keeps keys per owner), or None."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"idempotency-key":
            principal: Principal | None = scope.get("edgegen.principal")
            return (principal.owner.encode() if principal is not None else b"") + b"\0" + value
    return None


def node_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The client side of mutual TLS to the nodes, when configured."""
    tls = settings.nodes_tls
    return client_context(tls.ca_file, tls.cert_file, tls.key_file) if tls is not None else None
