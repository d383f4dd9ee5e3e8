"""One pure-ASGI middleware for what every request needs before and after its route.

- a request id: `X-Request-ID` when it is sane, else a new one; set for the logs and echoed back;
- limits: headers over `max_header_bytes` get 431, a body over `max_body_bytes` gets 413 — from its
  Content-Length before anything is read, or, when it is chunked, as soon as the running count passes
  the limit; a request with both Content-Length and Transfer-Encoding (a smuggling shape) gets 400;
  a pushed model package (`PUT /admin/models/{name}/package`, `UPLOADS`) has `max_upload_bytes`
  instead, and its route streams the body to disk;
- one access-log line and the latency histogram per request, labelled by route template and model.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgegen.errors import PayloadTooLarge
from edgegen.http.errors import error_response, is_openai
from edgegen.observe.logs import AccessLog, request_id
from edgegen.observe.metrics import NodeMetrics
from edgegen.security.transport import UPLOADS

access = logging.getLogger("edgegen.access")
SANE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
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
) -> tuple[bytes | None, Refusal | None]:
    """One pass over a request's headers: the `X-Request-ID` it gave, and why its head alone refuses it
    — headers over the limit (431), a smuggling shape (two Content-Lengths, or one with
    Transfer-Encoding: 400), a body announced over the limit (413) — or None.

    >>> read_head([(b"content-length", b"2"), (b"content-length", b"2")], 1024, 1024)
    (None, ('Content-Length is invalid', 400))
    """
    given = None
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
    if header_bytes > max_header_bytes:
        return given, (f"request headers exceed {max_header_bytes} bytes", 431)
    if content_length is not None:
        if chunked:
            return given, ("a request may not carry both Content-Length and Transfer-Encoding", 400)
        if not content_length.isdigit():
            return given, ("Content-Length is invalid", 400)
        if int(content_length) > max_body_bytes:
            return given, (f"request body exceeds {max_body_bytes} bytes", 413)
    return given, None


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: NodeMetrics,
        max_body_bytes: int,
        max_header_bytes: int,
        access_log: AccessLog,
        max_upload_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.max_upload = max_upload_bytes or max_body_bytes
        self.max_headers = max_header_bytes
        self.access_log = access_log
        self.request_ids = RequestIds()
        self.inflight = 0  # live requests being answered (the job workers give way to them)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        upload = scope["method"] == "PUT" and UPLOADS.fullmatch(scope["path"]) is not None  # (a node's)
        limit = self.max_upload if upload else self.max_body
        given, refusal = read_head(scope["headers"], self.max_headers, limit)
        rid = self.request_ids.take(given)
        token = request_id.set(rid)
        status = 500
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        self.inflight += 1
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
        finally:
            self.inflight -= 1
            self._record(scope, status, time.perf_counter() - started)
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

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        try:
            # The seed's routes name their template themselves; FastAPI's routes leave theirs in scope.
            template = scope.get("edgegen.route") or getattr(scope.get("route"), "path", "unmatched")
            model = scope.get("state", {}).get("model", "")
            self.metrics.observe_request(template, scope["method"], model, status, seconds)
            self.access_log.write(
                {
                    "request_id": request_id.get(),
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round(seconds * 1000, 3),
                    "model": model,
                }
            )
        except Exception:
            access.exception("request accounting failed")
