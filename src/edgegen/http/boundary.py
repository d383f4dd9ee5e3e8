"""Where every request enters a node or a gateway, and the one order of what wraps their routes.

    client ─▶ RequestBoundary ─▶ SecurityGate ─▶ the app's routes        (`edge_stack` builds it)

`RequestBoundary`, outermost, so that even a request the gate refuses is counted and logged:
- a request id: `X-Request-ID` when it is sane, else a new one; set for the logs and echoed back;
- limits: headers over `max_header_bytes` get 431, a body over its limit gets 413 — from its
  Content-Length before anything is read, or, when it is chunked, as soon as the running count passes
  the limit; a request with both Content-Length and Transfer-Encoding (a smuggling shape) gets 400.
  The limit is `max_body_bytes`, or an upload route's own (a pushed model package, a wheel), whose
  route streams the body to disk;
- one access-log line and one observation (latency, status) per request, labelled by route template
  and model; a request cancelled before its answer began (its caller left: a gRPC call past its
  deadline) is a 499, as nginx logs it, not a server error;
- its trace (observe/tracing.py): the trace id of a valid `traceparent` in its log lines, and with
  tracing on a server span, the parent of the spans made while it is served.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgegen.config import TracingSettings
from edgegen.errors import PayloadTooLarge, is_openai
from edgegen.http.errors import error_response
from edgegen.observe import tracing
from edgegen.observe.logs import AccessLog, request_id
from edgegen.observe.tracing import Entered
from edgegen.security.audit import AuditLog
from edgegen.security.gate import build_gate
from edgegen.security.settings import SecuritySettings, TlsSettings

access = logging.getLogger("edgegen.access")
# What a request id may be: a client's X-Request-ID kept as it came, or one asked for in the fleet's logs.
REQUEST_ID = r"^[A-Za-z0-9._:-]{1,128}$"
SANE_ID = re.compile(REQUEST_ID.encode())
Refusal = tuple[str, int]  # (message, status)


class RequestIds:
    """A request's id: its `X-Request-ID` when sane, else a new one — a random per-process prefix and a
    counter, unique across workers and cheap."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)

    def take(self, given: bytes | None) -> str:
        if given is not None and SANE_ID.match(given):
            return given.decode()
        return f"{self._prefix}{next(self._counter):010x}"


def read_head(
    headers: Iterable[tuple[bytes, bytes]], max_header_bytes: int, max_body_bytes: int
) -> tuple[bytes | None, bytes | None, Refusal | None]:
    """One pass over a request's headers: the `X-Request-ID` it gave, its `traceparent` (two of them
    are none: W3C's rule), and why its head alone refuses it — headers over the limit (431), a
    smuggling shape (two Content-Lengths, or one with Transfer-Encoding: 400), a body announced over
    the limit (413) — or None.

    >>> read_head([(b"content-length", b"2"), (b"content-length", b"2")], 1024, 1024)
    (None, None, ('Content-Length is invalid', 400))
    """
    given = traceparent = None
    content_length: bytes | None = None
    chunked = False
    header_bytes = 0
    for key, value in headers:
        header_bytes += len(key) + len(value) + 4
        if key == b"x-request-id":
            given = value
        elif key == b"content-length":
            # A second Content-Length is a smuggling shape: make it fail the digit check.
            content_length = b"duplicate" if content_length is not None else value
        elif key == b"transfer-encoding":
            chunked = True
        elif key == b"traceparent":
            traceparent = b"duplicate" if traceparent is not None else value
    if header_bytes > max_header_bytes:
        return given, traceparent, (f"request headers exceed {max_header_bytes} bytes", 431)
    if content_length is not None:
        if chunked:
            refusal = ("a request may not carry both Content-Length and Transfer-Encoding", 400)
            return given, traceparent, refusal
        if not content_length.isdigit():
            return given, traceparent, ("Content-Length is invalid", 400)
        if int(content_length) > max_body_bytes:
            return given, traceparent, (f"request body exceeds {max_body_bytes} bytes", 413)
    return given, traceparent, None


class RequestObserver(Protocol):
    """What counts requests: a node's metrics (latency by route and model), a gateway's (by status)."""

    def observe_request(
        self, template: str, method: str, model: str, status: int, seconds: float
    ) -> None: ...


class EdgeSettings(Protocol):
    """What the stack reads of a node's or a gateway's settings."""

    @property
    def security(self) -> SecuritySettings: ...

    @property
    def tls(self) -> TlsSettings: ...

    @property
    def home(self) -> Path: ...

    @property
    def keys_file(self) -> Path: ...

    @property
    def max_body_bytes(self) -> int: ...

    @property
    def max_header_bytes(self) -> int: ...

    @property
    def tracing(self) -> TracingSettings: ...


Upload = tuple[str, re.Pattern[str], int]  # (method, path, the body limit of that route)


class InFlight:
    """How many requests are being answered now; read by calling it (a node's job workers give way to
    live requests, and its status shows the count)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        return self.count


class RequestBoundary:
    def __init__(
        self,
        app: ASGIApp,
        observer: RequestObserver,
        access_log: AccessLog,
        *,
        max_body_bytes: int,
        max_header_bytes: int,
        uploads: Sequence[Upload] = (),
        in_flight: InFlight | None = None,
    ) -> None:
        self.app = app
        self.observer = observer
        self.access_log = access_log
        self.max_body = max_body_bytes
        self.max_headers = max_header_bytes
        self.uploads = uploads
        self.request_ids = RequestIds()
        self.in_flight = in_flight or InFlight()

    def body_limit(self, method: str, path: str) -> int:
        for upload_method, route, limit in self.uploads:
            if method == upload_method and route.fullmatch(path) is not None:
                return limit
        return self.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        limit = self.body_limit(scope["method"], scope["path"])
        given, traceparent, refusal = read_head(scope["headers"], self.max_headers, limit)
        rid = self.request_ids.take(given)
        token = request_id.set(rid)
        traced = None
        if traceparent is not None or tracing.tracer is not None:
            attributes = {"url.path": scope["path"], "edgegen.request_id": rid}
            traced = tracing.enter(traceparent, scope["method"], attributes)
        status = 0  # (none yet)
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        self.in_flight.count += 1
        try:
            if refusal is not None:
                message, code = refusal
                access.info("request refused", extra={"status": code, "reason": message})
                response = error_response(
                    message, code, {"Connection": "close"}, openai=is_openai(scope["path"])
                )
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive, limit), send_with_id)
        except asyncio.CancelledError:
            # Cancelled before any answer: its caller left (a gRPC call past its deadline, or cancelled),
            # or the server stops. nginx's 499, never a server error that error-rate alerts would count.
            status = status or 499
            raise
        finally:
            self.in_flight.count -= 1
            self._record(scope, status or 500, time.perf_counter() - started, traced)
            request_id.reset(token)

    def _limited(self, receive: Receive, limit: int) -> Receive:
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            return message

        return receive_limited

    def _record(self, scope: Scope, status: int, seconds: float, traced: Entered | None) -> None:
        try:
            # Pure-ASGI routes name their template themselves; FastAPI's routes leave theirs in scope.
            matched: str = getattr(scope.get("route"), "path", "unmatched")
            template = scope.get("edgegen.route") or matched
            model = scope.get("state", {}).get("model", "")
            self.observer.observe_request(template, scope["method"], model, status, seconds)
            line = {
                "request_id": request_id.get(),
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "ms": round(seconds * 1000, 3),
                "model": model,
            }
            # A gRPC call (http/grpc.py): its method, beside its twin's path.
            if "edgegen.grpc" in scope:
                line["rpc"] = template
            if traced is not None:
                line["trace_id"] = traced.trace_id
                route = None if template == "unmatched" else template  # (a relayed request: its path)
                name = f"{scope['method']} {route}" if route else None
                traced.close(name, status, {"http.route": route, "edgegen.model": model or None})
            self.access_log.write(line)
        except Exception:
            access.exception("request accounting failed")


def edge_stack(
    routes: ASGIApp,
    settings: EdgeSettings,
    audit: AuditLog,
    registry: CollectorRegistry,
    observer: RequestObserver,
    access_log: AccessLog,
    uploads: Sequence[Upload] = (),
    in_flight: InFlight | None = None,
) -> RequestBoundary:
    """A node's or a gateway's routes wrapped, in the one order both apps share: the boundary, then the
    security gate (credentials, roles, rate limits, intrusion guard; admin changes to `audit`, its
    metrics in `registry`). Tracing is set up here for the process, as its `[tracing]` says."""
    t = settings.tracing
    tracing.configure(
        t.endpoint,
        t.service_name,
        t.sample_ratio,
        ca_file=t.ca_file,
        cert_file=t.cert_file,
        key_file=t.key_file,
    )
    gate = build_gate(
        routes,
        settings.security,
        settings.keys_file,
        audit,
        registry,
        mutual_tls=settings.tls.mutual,
    )
    return RequestBoundary(
        gate,
        observer,
        access_log,
        max_body_bytes=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
        uploads=uploads,
        in_flight=in_flight,
    )
