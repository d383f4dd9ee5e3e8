"""Traces across the hops: W3C trace context in and out, OpenTelemetry spans over OTLP/HTTP — or nothing.

    [tracing]                                      (a node's and a gateway's settings alike)
    endpoint = "http://collector:4318/v1/traces"   empty, the default: off
    sample_ratio = 1.0                             traces begun here that are kept; a caller's flag rules
    ca_file, cert_file, key_file                   an https collector: the CA it is checked against (else
                                                   the system's), the certificate shown to it (mutual TLS)

One chat through the gateway, as one trace:

    gateway  POST /v1/chat/completions          server span; parent: the client's `traceparent`, if any
               └ relay                          its id is the `traceparent` the node gets
    node           └ POST /v1/chat/completions  server span
                       ├ cache.lookup
                       ├ llm.queue              waiting for a slot and room in the KV cache
                       ├ llm.prefill            the prompt into the KV cache, up to the first token
                       └ llm.decode             the first token to the last
    a fixed-shape model: batch.queue, then batch.forward; a job: job.run, whose parent is the request
    that queued it, with the same spans beneath

Off, no span is made and no exporter thread runs: each hook is one test of `tracer`. A request's valid
`traceparent` is still read (the request boundary looks at every header anyway) and its trace id written
in the request's log lines, and the gateway passes the header on as it came: a client's trace can be
followed through every process's logs whether or not they record spans.

On, a span that ends becomes a plain tuple on the queue of our own OTLP/HTTP exporter (observe/otlp.py),
which encodes and sends batches from its own thread. The engine's spans are written after the fact, with
the times noted as the work went (`GenerationTrace`, `BatchTrace`): a decode step or a batch serves
several requests at once, and each request's trace gets its own span of it.
"""

from __future__ import annotations

import atexit
import contextvars
import os
import random
import re
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from edgegen.errors import ConfigError
from edgegen.observe.logs import trace_id
from edgegen.observe.otlp import SpanExporter

# version-trace_id-parent_id-flags, lowercase hex; a later version may add fields after a dash.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[ -~]*)?")
TRACE_ID = r"^[0-9a-f]{32}$"  # a trace id as log lines carry it (and as one is asked for in the logs)
_MAX_TRACEPARENT = 512  # the longest value looked at; a longer one is refused unread
_NO_TRACE, _NO_SPAN = b"0" * 32, b"0" * 16  # all-zero ids: not valid


class TraceParent(NamedTuple):
    """A valid W3C `traceparent`: the trace, the caller's span in it, and the flags (bit 0: sampled). (A
    tuple: one is made for every request that carries the header, and a frozen dataclass costs twice as
    much to make.)"""

    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16
    flags: int

    def header(self) -> bytes:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}".encode()


def parse_traceparent(value: bytes | str | None) -> TraceParent | None:
    """The `traceparent` header's value, or None when it is absent or not valid (W3C Trace Context:
    version ff, all-zero ids, uppercase hex and a version-00 value with more fields are not valid).

    >>> parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").span_id
    '00f067aa0ba902b7'
    >>> parse_traceparent(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01") is None
    True
    """
    if value is None or len(value) > _MAX_TRACEPARENT:
        return None
    raw = (value.encode("latin-1", "replace") if isinstance(value, str) else value).strip(b" \t")
    match = _TRACEPARENT.fullmatch(raw)
    if match is None:
        return None
    version, trace, span, flags, more = match.groups()
    if version == b"ff" or (version == b"00" and more) or trace == _NO_TRACE or span == _NO_SPAN:
        return None
    return TraceParent(trace.decode(), span.decode(), int(flags, 16))


class SpanRef(NamedTuple):
    """A span as its children see it: its ids, whether it is kept (sampled), whether another process
    made it. (A tuple: one is made for every span, and a frozen dataclass costs twice as much to make.)"""

    trace_id: int
    span_id: int
    sampled: bool
    remote: bool = False

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


# The span being served in this task (tracing on): the parent of the spans made beneath it.
current_span: contextvars.ContextVar[SpanRef | None] = contextvars.ContextVar("current_span", default=None)


class LiveSpan:
    """A span begun now: attributes may be added until its owner ends it, which sends it (when kept)."""

    __slots__ = ("_tracer", "attributes", "kind", "name", "parent", "ref", "start")

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        parent: SpanRef | None,
        kind: str,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        self._tracer, self.name, self.parent, self.kind = tracer, name, parent, kind
        self.ref = tracer.child_of(parent)
        self.attributes = {} if attributes is None else attributes
        self.start = time.time_ns()

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def end(self, error: bool = False) -> None:
        self._tracer.emit(
            self.name, self.ref, self.parent, self.start, time.time_ns(), self.attributes, self.kind, error
        )


class Entered:
    """A request (or a job's run) inside this process: its trace id, set for the log lines while it
    runs, and with tracing on its span, current meanwhile (the spans made beneath it take it as parent)."""

    __slots__ = ("_current", "_logged", "span", "trace_id")

    def __init__(self, trace: str, span: LiveSpan | None = None) -> None:
        self.trace_id = trace
        self.span = span
        self._current = current_span.set(span.ref) if span is not None else None
        self._logged = trace_id.set(trace)

    def close(
        self, name: str | None = None, status: int | None = None, attributes: dict[str, Any] | None = None
    ) -> None:
        """End the span (renamed to `name` once the route is known; an error from `status` 500 on; the
        `attributes` that are not None added) and restore what was current before."""
        try:
            span = self.span
            if span is not None:
                if name is not None:
                    span.name = name
                kept = span.attributes
                if attributes:
                    for key, value in attributes.items():
                        if value is not None:
                            kept[key] = value
                if status is not None:
                    kept["http.response.status_code"] = status
                span.end(error=status is not None and status >= 500)
        finally:
            if self._current is not None:
                current_span.reset(self._current)
            trace_id.reset(self._logged)


def enter(
    traceparent: bytes | str | None,
    name: str,
    attributes: dict[str, Any] | None = None,
    *,
    job: bool = False,
) -> Entered | None:
    """Start serving a request (or running a `job`) under `traceparent`: None when there is nothing to
    note (tracing off and no valid `traceparent`), else `Entered` — with a span named `name` when
    tracing is on, which takes `attributes` (the dict itself, not a copy). A request calls it only when
    one of the two holds (both tests are free)."""
    parent = parse_traceparent(traceparent)
    if tracer is not None:
        return tracer.enter(name, parent, attributes, job=job)
    return Entered(parent.trace_id) if parent is not None else None


class Tracer:
    """Spans made here and handed to our OTLP/HTTP exporter (observe/otlp.py) as plain tuples. Made by
    `configure` only when an endpoint is set.

    Why not OpenTelemetry's SDK: on the 2-core test machine a span through it cost 6-12 µs on the
    request's path (two `SpanContext`s, a `ReadableSpan`, the batch processor's lock) and ~30 µs more to
    encode in its exporter's thread, holding the GIL against the serving loop; a prediction through
    gateway and node makes 6 spans, and p50 at one client rose ×1.24. Here a span costs the request's
    path 2-3 µs (its ids, a `SpanRef`, a tuple queued; a server span 5 µs with its `Entered`) and 3-4 µs
    to encode in the exporter's thread (a prediction's six spans, protobuf written as bytes).

    Sampling is OpenTelemetry's `ParentBased(TraceIdRatioBased)` rule: a caller's sampled flag is
    followed, a trace begun here is kept when the low 64 bits of its id fall below `sample_ratio` of
    their range. Spans leave every `OTEL_BSP_SCHEDULE_DELAY` ms (the SDK's variable; 1000 unless set),
    or as soon as a batch of them waits.
    """

    def __init__(
        self, endpoint: str, service_name: str, sample_ratio: float, tls: ssl.SSLContext | None = None
    ) -> None:
        self._bound = round(sample_ratio * (1 << 64))
        self._exporter = SpanExporter(
            endpoint,
            service_name,
            schedule_delay=_schedule_delay(),
            headers=export_headers(os.environ),
            tls=tls,
        )
        self._export = self._exporter.export
        atexit.register(self.close)  # what is still queued leaves before the process does

    def close(self) -> None:
        atexit.unregister(self.close)
        self._exporter.close()

    def child_of(self, parent: SpanRef | None) -> SpanRef:
        """A new span's ids: in `parent`'s trace, or (None) in a new trace, kept as `sample_ratio` says."""
        span_id = random.getrandbits(64) or 1
        if parent is not None:
            return SpanRef(parent.trace_id, span_id, parent.sampled)
        trace = random.getrandbits(128) or 1
        return SpanRef(trace, span_id, (trace & 0xFFFF_FFFF_FFFF_FFFF) < self._bound)

    def emit(
        self,
        name: str,
        ref: SpanRef,
        parent: SpanRef | None,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any] | None = None,
        kind: str = "internal",
        error: bool = False,
    ) -> None:
        """Send a span that is over (times in ns since the epoch), when its trace is kept."""
        if ref.sampled:
            up, remote = (None, False) if parent is None else (parent.span_id, parent.remote)
            self._export(
                (name, ref.trace_id, ref.span_id, up, start_ns, end_ns, attributes, kind, error, remote)
            )

    def enter(
        self, name: str, parent: TraceParent | None, attributes: dict[str, Any] | None, *, job: bool = False
    ) -> Entered:
        kind = "consumer" if job else "server"
        if parent is None:
            span = LiveSpan(self, name, None, kind, attributes)
            return Entered(f"{span.ref.trace_id:032x}", span)
        remote = SpanRef(int(parent.trace_id, 16), int(parent.span_id, 16), bool(parent.flags & 1), True)
        return Entered(parent.trace_id, LiveSpan(self, name, remote, kind, attributes))

    def span(self, name: str, attributes: dict[str, Any] | None = None) -> LiveSpan:
        """A span under the current one, begun now; the caller ends it."""
        return LiveSpan(self, name, current_span.get(), "internal", attributes)

    def relay(self) -> tuple[LiveSpan, bytes]:
        """The gateway's span around relaying the current request, and the `traceparent` that makes a
        node's span its child."""
        span = LiveSpan(self, "relay", current_span.get(), "client")
        return span, span.ref.traceparent().encode()

    def current(self) -> SpanRef | None:
        """What a span made later, elsewhere (the scheduler's loop), takes as its parent: the current
        span, or None when there is none or it is not kept (then neither is anything below it)."""
        found = current_span.get()
        return found if found is not None and found.sampled else None

    def traceparent(self) -> str | None:
        """The current span's `traceparent`, to be carried along (a queued job keeps it)."""
        found = current_span.get()
        return found.traceparent() if found is not None else None

    def record(
        self, name: str, parent: SpanRef, start_ns: int, end_ns: int, attributes: dict[str, Any] | None = None
    ) -> None:
        """A span that is over already, from `start_ns` to `end_ns` (ns since the epoch), under `parent`.
        Nothing is ever made beneath it, so it needs an id but no `SpanRef` of its own."""
        if parent.sampled:
            span_id = random.getrandbits(64) or 1
            self._export(
                (name, parent.trace_id, span_id, parent.span_id, start_ns, end_ns, attributes, "internal",
                 False, parent.remote)
            )  # fmt: skip

    def generation(self) -> GenerationTrace | None:
        parent = self.current()
        return GenerationTrace(self, parent) if parent is not None else None

    def batched(self) -> BatchTrace | None:
        parent = self.current()
        return BatchTrace(self, parent) if parent is not None else None


class GenerationTrace:
    """One generation's way through the scheduler, its times noted on the event loop as it goes: queued,
    given a slot, first token; told as three spans when it ends."""

    __slots__ = ("_parent", "_tracer", "admitted", "first", "submitted")

    def __init__(self, tracer: Tracer, parent: SpanRef) -> None:
        self._tracer, self._parent = tracer, parent
        self.submitted = time.time_ns()
        self.admitted = self.first = 0

    def admit(self) -> None:
        self.admitted = time.time_ns()

    def first_token(self) -> None:
        self.first = time.time_ns()

    def end(self, outcome: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
        """`outcome`: the finish reason ("stop", "length"), or "error", "cancelled"."""
        now, record = time.time_ns(), self._tracer.record
        record("llm.queue", self._parent, self.submitted, self.admitted or now)
        if self.admitted:
            prompt = {"edgegen.prompt_tokens": prompt_tokens, "edgegen.cached_tokens": cached_tokens}
            record("llm.prefill", self._parent, self.admitted, self.first or now, prompt)
        if self.first:
            decoded = {"edgegen.completion_tokens": completion_tokens, "edgegen.outcome": outcome}
            record("llm.decode", self._parent, self.first, now, decoded)


class BatchTrace:
    """One request to a dynamic batcher: queued at `submitted`; told as a wait and a forward pass."""

    __slots__ = ("_parent", "_tracer", "submitted")

    def __init__(self, tracer: Tracer, parent: SpanRef) -> None:
        self._tracer, self._parent = tracer, parent
        self.submitted = time.time_ns()

    def ran(self, started_ns: int, elapsed_ns: int, rows: int, requests: int) -> None:
        """Its batch's forward pass began at `started_ns` (since the epoch) and took `elapsed_ns`."""
        self._tracer.record("batch.queue", self._parent, self.submitted, started_ns)
        batch = {"edgegen.batch_rows": rows, "edgegen.batch_requests": requests}
        self._tracer.record("batch.forward", self._parent, started_ns, started_ns + elapsed_ns, batch)


# The process's tracer; None (the default) is tracing off. Set once at start-up by `configure`, with
# the settings it was given (the same again change nothing).
tracer: Tracer | None = None
_configured: tuple[object, ...] | None = None


def configure(
    endpoint: str,
    service_name: str,
    sample_ratio: float,
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> None:
    """Tracing on (an endpoint) or off (""), for this process; the same settings again change nothing.
    An https endpoint is checked against `ca_file` (else the system's CAs) and shown `cert_file` with
    `key_file` when given (a collector that asks for mutual TLS); a file that does not load fails the
    start with a ConfigError."""
    global tracer, _configured
    key = (endpoint, service_name, sample_ratio, ca_file, cert_file, key_file)
    if key == _configured:
        return
    shutdown()
    if endpoint:
        https = urllib.parse.urlsplit(endpoint).scheme == "https"
        tls = collector_context(ca_file, cert_file, key_file) if https else None
        tracer = Tracer(endpoint, service_name, sample_ratio, tls)
    _configured = key


def shutdown() -> None:
    """Tracing off, what is queued sent first: at a change of settings, and before the process is replaced
    by another (a restart, a software switch: `exec` runs no `atexit` handler)."""
    global tracer, _configured
    if tracer is not None:
        tracer.close()
    tracer, _configured = None, None


def collector_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """How the exporter checks an https collector (TLS 1.2 or later, its name checked) and, for mutual
    TLS, what it shows. The files are read now, so a missing or unreadable one stops the start."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[tracing] ca_file, cert_file or key_file does not load: {exc}") from None
    return context


def _schedule_delay() -> float:
    """Seconds between two sends: `OTEL_BSP_SCHEDULE_DELAY` (ms), OpenTelemetry's variable for it."""
    raw = os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "1000")
    try:
        delay = float(raw)
    except ValueError:
        delay = -1
    if not 0 < delay <= 3_600_000:
        raise ConfigError(f"OTEL_BSP_SCHEDULE_DELAY is milliseconds between span exports, got {raw!r}")
    return delay / 1000


# A header name (RFC 9110 token); what the exporter sets itself may not be given.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_OWN_HEADERS = frozenset({"content-type", "content-length", "host", "connection", "transfer-encoding"})
_HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")  # the first set wins


def export_headers(environ: Mapping[str, str]) -> dict[str, str]:
    """The headers the collector asks for (an API key, a tenant): `OTEL_EXPORTER_OTLP_TRACES_HEADERS`,
    else `OTEL_EXPORTER_OTLP_HEADERS` — OpenTelemetry's variables, `name=value` pairs split by commas,
    values percent-encoded. One that is not a header fails the start with a ConfigError that names the
    header, never its value (a secret).

    >>> export_headers({"OTEL_EXPORTER_OTLP_HEADERS": "api-key=a%3Db,x-tenant=t1"})
    {'api-key': 'a=b', 'x-tenant': 't1'}
    """
    variable = next((v for v in _HEADER_VARIABLES if environ.get(v)), None)
    if variable is None:
        return {}
    headers: dict[str, str] = {}
    for number, pair in enumerate(environ[variable].split(","), 1):
        name, equals, value = pair.partition("=")
        name = urllib.parse.unquote(name).strip().lower()
        value = urllib.parse.unquote(value).strip()
        if not equals or not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{variable}: pair {number} is not name=value with a header name")
        if name in _OWN_HEADERS:
            raise ConfigError(f"{variable}: {name} is set by the exporter itself")
        if not value or not all(" " <= c <= "~" or c == "\t" for c in value):
            raise ConfigError(f"{variable}: the value of {name} is empty or has characters a header may not")
        headers[name] = value
    return headers


def submitter(traceparent: str | None) -> str | None:
    """What a queued job keeps of the request that queued it: the current span's `traceparent` with
    tracing on, else the request's own when it is valid (its trace id then goes in the job's log lines)."""
    if tracer is not None:
        return tracer.traceparent()
    parent = parse_traceparent(traceparent)
    return parent.header().decode() if parent is not None else None
