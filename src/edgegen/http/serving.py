"""How a node and a gateway listen under uvicorn: the server, its connections, its TLS, its restart.

- `run(module, ...)`: uvicorn as every edgegen server runs (uvloop, httptools with deadlines, our own JSON
  logs, no proxy headers, a graceful shutdown that lets streams finish), one process or several.
- Restarting in place without a supervisor's help (a node's `POST /admin/restart`): the route calls
  `request_restart`, which sets `RESTART` and asks the server `run` started (`SERVER`) to exit; it shuts
  down gracefully (stops accepting, lets in-flight requests finish, runs the app's shutdown), and `run`
  replaces the process with a fresh one of the same command line. (A signal would not do: uvicorn
  re-raises SIGTERM once it has stopped, and the process would end there.) With several worker processes
  the supervisor gets SIGHUP and replaces the workers one by one while the others keep serving on the
  shared socket. `after_exit`, given to `run`, decides first what else the process may become (a node's
  software switch, node/lifecycle.py).

- `GuardedHttpProtocol`: uvicorn's httptools protocol plus what it lacks — deadlines for a request's
  head and body (a slowloris that trickles bytes is cut off with 408, where uvicorn's keep-alive timer
  restarts on every byte; a pushed package's body, per read), and the ASGI TLS extension
  (`scope["extensions"]["tls"]`) carrying the verified client certificate's subject, from which the
  security gate reads the caller's role. Each request runs in a cycle of our own (cycle.py), leaner than
  uvicorn's; the keep-alive timeout is one more deadline on the connection's one timer.
- `tls_context`: the TLS factory, from each server's own settings.

uvicorn takes a server's HTTP protocol class and TLS factory by reference and, with several workers,
pickles them into every worker process, so each app module still names its `HttpProtocol` (a
`GuardedHttpProtocol` whose `load` reads that server's settings) and its `ssl_context` at module level.
What differs between the two servers is only how a process reads its settings; the logic lives here.

    ssl_context = functools.partial(tls_context, _process_settings)   # in node/app.py, gateway/app.py
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import signal
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Callable
from typing import ClassVar, NoReturn, Protocol

import httptools
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from edgegen.http.cycle import RequestCycle
from edgegen.observe import tracing
from edgegen.security.settings import SecuritySettings, TlsSettings
from edgegen.security.transport import server_context, subject_name

log = logging.getLogger("edgegen.http")
RESTART = threading.Event()
SERVER: uvicorn.Server | None = None  # the one-process server, as `run` started it
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
    the deadlines come from their `[security]`.

    A connection has one deadline at a time — its next request's head, or the body of the request being
    read — and one timer for it. A request moves the deadline (a float); the timer, when it fires before
    the deadline, is set again for it. A kept-alive connection thus makes a timer once per deadline's
    length, not two a request (a timer made and cancelled costs ~4 µs, 2 % of a relayed prediction).
    """

    load: ClassVar[Callable[[], ServerSettings]]
    _timer: asyncio.TimerHandle | None = None
    _deadline = 0.0  # loop time by which what is awaited must have arrived
    _awaiting: bytes | None = None  # what is awaited: b"head", b"body", or None (nothing)
    _upload = False  # this request's body is a pushed package: its deadline is per read (`UPLOADS`)
    _tls: dict[object, object] | None = None

    cycle: RequestCycle | None  # type: ignore[assignment]  # (ours, not uvicorn's: cycle.py)

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
        security = type(self).load().security
        self._head_s, self._body_s = float(security.header_timeout_s), float(security.body_timeout_s)
        self._send_s = float(security.send_timeout_s)
        self._expect(b"head", self._head_s)

    def _expect(self, what: bytes | None, seconds: float = 0.0) -> None:
        """Await `what` (None: nothing) within `seconds` from now."""
        self._awaiting = what
        if what is None:
            return
        self._deadline = deadline = self.loop.time() + seconds
        if self._timer is not None and self._timer.when() > deadline:  # (a shorter deadline than the last)
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._awaiting is None or self.transport.is_closing():
            return
        if self.loop.time() < self._deadline:  # the deadline moved on since the timer was set
            self._timer = self.loop.call_at(self._deadline, self._due)
        elif self._awaiting == b"idle":  # a kept-alive connection past uvicorn's `timeout_keep_alive`
            self.transport.close()
        elif self._awaiting == b"head":
            log.info("request refused", extra={"status": 408, "reason": "request head too slow"})
            self.transport.write(_HEAD_TIMEOUT)
            self.transport.close()
        else:
            self._body_too_slow()

    def _body_too_slow(self) -> None:
        """The app is still waiting for the body: answer 408 unless it already answered, and close (the
        app's next `receive()` then says the client is gone)."""
        log.info("request refused", extra={"status": 408, "reason": "request body too slow"})
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.response_started = True  # the app's own answer, if any, goes nowhere
            self.transport.write(_BODY_TIMEOUT)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}
        if self._awaiting != b"head":  # (a connection's first request was awaited since it was made)
            self._expect(b"head", self._head_s)

    def on_headers_complete(self) -> None:
        """The request's scope completed from its head, and its cycle (cycle.py) started, or queued behind
        the one before it (a pipelined request)."""
        parser, scope = self.parser, self.scope
        http_version = parser.get_http_version()
        method = scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        url = httptools.parse_url(self.url)
        raw_path: bytes = url.path
        path = raw_path.decode("ascii")
        scope["path"] = urllib.parse.unquote(path) if "%" in path else path
        scope["raw_path"] = raw_path
        scope["query_string"] = url.query or b""
        previous = self.cycle
        self.cycle = RequestCycle(
            scope,  # type: ignore[arg-type]
            self.transport,
            self.flow,
            self.server_state.default_headers,
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
            send_timeout_s=self._send_s,
        )
        if previous is None or previous.response_complete:
            self._start_asgi_task(self.cycle, self.app)  # type: ignore[arg-type]
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))  # type: ignore[arg-type]
        self._upload = method in ("PUT", "POST") and UPLOADS.fullmatch(scope["path"]) is not None
        self._expect(b"body", self._body_s)

    def on_body(self, body: bytes) -> None:
        if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:  # type: ignore[union-attr]
            return
        self.cycle.add_body(body)  # type: ignore[union-attr]
        if self._upload:  # an upload: no byte for the deadline, not all of it
            self._deadline = self.loop.time() + self._body_s

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade() and self._should_upgrade():
            self._expect(None)  # (the connection is uvicorn's WebSocket protocol's from here)
        elif self.cycle.response_complete:  # type: ignore[union-attr]
            # Answered before its body was whole (a refusal): idle from now, unless a request waits.
            self._expect(None if self.pipeline else b"idle", self.timeout_keep_alive)
        else:
            self._expect(None)
            self.cycle.body_complete()  # type: ignore[union-attr]

    def on_response_complete(self) -> None:
        """An answer went whole: the next pipelined request starts, or the connection waits, idle, at most
        uvicorn's `timeout_keep_alive` for one (on the connection's one timer, not a new one per answer)."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._awaiting is None:
            self._expect(b"idle", self.timeout_keep_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._awaiting = None
        super().connection_lost(exc)


def run(
    module: str,
    host: str,
    port: int,
    workers: int = 1,
    *,
    tls: bool = False,
    after_exit: Callable[[bool], None] | None = None,
) -> bool:
    """Serve `module`'s `app_from_environment` (with its `HttpProtocol`, and its `ssl_context` when `tls`)
    until the server stops; then `after_exit(failed_start)`, then, when a restart was asked for, the same
    command again in this process. Gives whether the server started (uvicorn said why it did not)."""
    server = importlib.import_module(module)
    config = uvicorn.Config(
        f"{module}:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=server.HttpProtocol,
        ssl_context_factory=server.ssl_context if tls else None,
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,  # forwarded headers are the gateway's business, never a client's
        timeout_graceful_shutdown=60,  # in-flight requests and streams finish (a gateway drains first)
    )
    if workers > 1:
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
        if after_exit is not None:
            after_exit(any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes))
        return True
    global SERVER
    try:
        config.load_app()
        SERVER = uvicorn.Server(config)
        SERVER.run()
    except Exception:
        log.exception("the server failed to start")
        if after_exit is not None:
            after_exit(True)
        raise
    if after_exit is not None:
        after_exit(not SERVER.started)
    if RESTART.is_set():
        replace_process(sys.executable, sys.orig_argv[1:])
    return bool(SERVER.started)


def replace_process(python: str, args: list[str]) -> NoReturn:
    """Become `python args` (a restart; a software switch, node/lifecycle.py). What this process still
    has to say leaves first: its output, and its queued spans (`exec` runs no `atexit` handler)."""
    tracing.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(python, [python, *args])  # noqa: S606 (our own command line, our environments)  # nosec B606


def can_restart(multiprocess: bool) -> bool:
    """Whether this process knows how to restart itself (its server runs under `run`)."""
    return multiprocess or SERVER is not None


def top_pid(multiprocess: bool) -> int:
    """The process that runs on after the server stops: the supervisor's, with several workers."""
    return os.getppid() if multiprocess else os.getpid()


def request_restart(multiprocess: bool) -> None:
    if multiprocess:
        log.info("restart requested: the supervisor replaces the workers one by one")
        os.kill(os.getppid(), signal.SIGHUP)
        return
    log.info("restart requested: graceful shutdown, then the same command again")
    RESTART.set()
    request_exit(multiprocess)


def request_exit(multiprocess: bool) -> None:
    """Stop serving gracefully; what follows is `run`'s `after_exit`, then a restart if one was asked."""
    if multiprocess:
        os.kill(os.getppid(), signal.SIGTERM)
        return
    assert SERVER is not None, "checked by can_restart"
    SERVER.should_exit = True
