"""How a node and a gateway listen under uvicorn: their connections and their TLS context.

- `GuardedHttpProtocol`: uvicorn's httptools protocol plus what it lacks — deadlines for a request's
  head and body (a slowloris that trickles bytes is cut off with 408, where uvicorn's keep-alive timer
  restarts on every byte; a pushed package's body, per read), and the ASGI TLS extension
  (`scope["extensions"]["tls"]`) carrying the verified client certificate's subject, from which the
  security gate reads the caller's role.
- `tls_context`: the TLS factory, from each server's own settings.

uvicorn takes a server's HTTP protocol class and TLS factory by reference and, with several workers,
pickles them into every worker process, so each app module still names its `HttpProtocol` (a
`GuardedHttpProtocol` whose `load` reads that server's settings) and its `ssl_context` at module level.
What differs between the two servers is only how a process reads its settings; the logic lives here.

    ssl_context = functools.partial(tls_context, _process_settings)   # in node/app.py, gateway/app.py
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgegen.security.settings import SecuritySettings, TlsSettings
from edgegen.security.transport import server_context, subject_name

log = logging.getLogger("edgegen.http")
# Where a model package is pushed: a node's (`PUT`, streamed to disk) and a gateway's (`POST`, spooled). A
# large package on a slow link takes longer than `body_timeout_s`, so there the deadline is per read, as
# nginx's client_body_timeout: a body that stops arriving is still cut off.
UPLOADS = re.compile(r"/admin/models/[^/]+/package|/gateway/models/[^/]+/rollout")


def _timeout_response(what: str) -> bytes:
    body = b'{"error":"the request %s did not arrive in time"}' % what.encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )


_HEAD_TIMEOUT, _BODY_TIMEOUT = _timeout_response("head"), _timeout_response("body")


class ServerSettings(Protocol):
    """What serving reads of a node's or a gateway's settings: deadlines and TLS."""

    @property
    def security(self) -> SecuritySettings: ...

    @property
    def tls(self) -> TlsSettings: ...


def tls_context(load: Callable[[], ServerSettings], config: object, default: object) -> ssl.SSLContext:
    """uvicorn's `ssl_context_factory` once `load` is bound: TLS from the settings `load` reads, in each
    worker process (uvicorn's own `config` and `default` factory are not used)."""
    return server_context(load().tls)


class GuardedHttpProtocol(HttpToolsProtocol):
    """A server's subclass sets `load` to how it reads its settings (cached per process, in every worker);
    the deadlines come from their `[security]`. Each is one timer per request, not a timeout around
    every `receive()` in the app (5 µs each)."""

    load: ClassVar[Callable[[], Any]]
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    _upload = False  # this request's body is a pushed package: its deadline is per read (`UPLOADS`)
    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            cert = ssl_object.getpeercert()
            self._tls = {
                "client_cert_name": subject_name(cert) if cert else None,
                "tls_version": ssl_object.version(),
                "cipher_suite": None,
            }
        self._arm()

    def head_timeout(self) -> float:
        return float(self.load().security.header_timeout_s)

    def body_timeout(self) -> float:
        return float(self.load().security.body_timeout_s)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout(), self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info("request refused", extra={"status": 408, "reason": "request head too slow"})
            self.transport.write(_HEAD_TIMEOUT)
            self.transport.close()

    def _body_too_slow(self) -> None:
        """The app is still waiting for the body: answer 408 unless it already answered, and close (the
        app's next `receive()` then says the client is gone)."""
        self._body_timer = None
        if self.transport.is_closing():
            return
        log.info("request refused", extra={"status": 408, "reason": "request body too slow"})
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.response_started = True  # the app's own answer, if any, goes nowhere
            self.transport.write(_BODY_TIMEOUT)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[typeddict-unknown-key]
        self._arm()

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        path = self.scope.get("path", "")
        self._upload = self.scope["method"] in ("PUT", "POST") and UPLOADS.fullmatch(path) is not None
        if self._body_timer is None:
            self._body_timer = self.loop.call_later(self.body_timeout(), self._body_too_slow)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._upload and self._body_timer is not None:  # an upload: no byte for the timeout, not all of it
            self._body_timer.cancel()
            self._body_timer = self.loop.call_later(self.body_timeout(), self._body_too_slow)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        super().connection_lost(exc)
