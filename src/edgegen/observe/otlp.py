"""Spans out over OTLP/HTTP, in protobuf written here: no OpenTelemetry package at run time.

A span is a plain tuple (`Span`); the request's path appends it to a bounded queue and goes on
(`SpanExporter.export`, well under a µs). One daemon thread wakes every `schedule_delay`, or as soon as
`BATCH` spans wait, encodes them as one `ExportTraceServiceRequest` (opentelemetry-proto's
collector/trace/v1) and POSTs it, `Content-Type: application/x-protobuf`, over a kept-alive connection.
Why not the SDK's exporter: its Python protobuf classes took ~30 µs a span to encode, in a thread that
holds the GIL against the serving loop; the fields below, written as bytes, take a few.

The wire format, as much of it as a span of ours needs (field number, wire type: 0 varint, 1 fixed64,
2 length-delimited, 5 fixed32; each field is its tag `number << 3 | type` as a varint, then its value,
a length-delimited value preceded by its length as a varint):

    ExportTraceServiceRequest  1:2 ResourceSpans (one)
    ResourceSpans              1:2 Resource          2:2 ScopeSpans (one)
    Resource                   1:2 KeyValue          service.name = the service's name
    ScopeSpans                 1:2 InstrumentationScope { 1:2 name "edgegen" }   2:2 Span (each)
    Span                       1:2 trace_id (16 bytes, big-endian)   2:2 span_id (8)   4:2 parent_span_id (8)
                               5:2 name (UTF-8)   6:0 kind   7:1 start_time_unix_nano   8:1 end_time_unix_nano
                               9:2 KeyValue (each attribute)   15:2 Status { 3:0 code 2 = ERROR }
                               16:5 flags: 0x01 sampled | 0x100 "is-remote known" | 0x200 parent is remote
    KeyValue                   1:2 key   2:2 AnyValue
    AnyValue                   1:2 string   2:0 bool   3:0 int64 (two's complement, 10 bytes if negative)
                               4:1 double

An attribute of another type (or an int past int64) is sent as its `str()`. A span without an error
leaves its status unset, as the SDK did. Failures to send are logged (at most once a minute, with the
count of spans lost) and never raised: observability never breaks serving.
"""

from __future__ import annotations

import collections
import http.client
import logging
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

from edgegen.memo import Memo

log = logging.getLogger("edgegen.tracing")

# name, trace id, span id, parent span id (None: a root), start and end (ns since the epoch), attributes,
# kind ("internal", "server", "client", "consumer"), error, whether the parent came from another process.
Span = tuple[str, int, int, int | None, int, int, dict[str, Any] | None, str, bool, bool]

# Spans in one request; a full batch wakes the thread before its timer does. A request costs the sending
# thread ~250-400 µs of CPU (http.client) whatever it carries, and the collector as much again: at 64 spans
# a request, a prediction (6 spans) paid ~40 µs for it, and p50 at one client rose ×1.2; at 512, OpenTelemetry
# SDK's default too, a few µs. They are encoded `SLICE` at a time, the GIL let go between slices, so the
# serving loop waits ~0.2 ms at most for the thread, not the ~1.3 ms a whole batch takes.
BATCH, SLICE = 512, 64
QUIET_S = 60.0  # the shortest time between two warnings of one kind

_KINDS = {"internal": 1, "server": 2, "client": 3, "consumer": 5}  # Span.SpanKind
# 1:2 trace_id, 2:2 span_id (and 4:2 parent_span_id): ids are big-endian, the protobuf's bytes as W3C's hex
_ROOT = struct.Struct(">BB16sBBQ")
_CHILD = struct.Struct(">BB16sBBQBBQ")
# 6:0 kind, 7:1 start, 8:1 end, 16:5 flags (its tag is two bytes: 0x85 0x01, little-endian 0x0185)
_TAIL = struct.Struct("<BBBQBQHI")
_FLAGS = (0x101, 0x301)  # sampled, and whether the parent is remote is known: no, yes
_ERROR = b"\x7a\x02\x18\x02"  # 15:2 Status, 2 bytes: 3:0 code = 2
_DOUBLE = struct.Struct("<Bd")  # 4:1 double_value
_SMALL = [bytes((n,)) for n in range(0x80)]
_INT64 = 1 << 63
# (key, value) → its KeyValue field, for str and int values: most recur (routes, models, statuses), and a
# cached attribute costs a fifth of one encoded. Cleared when full, so a unique value (a request id) costs
# the cache nothing lasting.
_encoded: Memo[tuple[str, str | int], bytes] = Memo(4096)


def _varint(n: int) -> bytes:
    """`n` ≥ 0 as a protobuf varint: 7 bits a byte, least significant first, the high bit set on all
    but the last."""
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate: replaced, rather than lose the whole batch
        return text.encode("utf-8", "replace")


def _string(tag: bytes, text: str) -> bytes:
    raw = _utf8(text)
    return tag + _varint(len(raw)) + raw


def _value(value: Any) -> bytes:
    """An AnyValue's fields: the exact types first (the common case, one test each), then their
    subclasses (an enum), then anything else as its `str()`."""
    kind = type(value)
    if kind is str:
        return _string(b"\x0a", value)
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int and -_INT64 <= value < _INT64:
        return b"\x18" + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)
    if kind is float:
        return _DOUBLE.pack(0x21, value)
    if isinstance(value, str):
        return _string(b"\x0a", value)
    if isinstance(value, int) and -_INT64 <= value < _INT64:
        return b"\x18" + _varint(int(value) & 0xFFFF_FFFF_FFFF_FFFF)
    if isinstance(value, float):
        return _DOUBLE.pack(0x21, value)
    return _string(b"\x0a", str(value))


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue, its length first."""
    any_value = _value(value)
    pair = _string(b"\x0a", key) + b"\x12" + _varint(len(any_value)) + any_value
    return _varint(len(pair)) + pair


def _attribute(key: str, value: Any) -> bytes:
    """A Span's 9:2 KeyValue field."""
    kind = type(value)
    if kind is not str and kind is not int:
        return b"\x4a" + _key_value(key, value)
    found = _encoded.get((key, value))
    if found is None:
        found = _encoded.remember((key, value), b"\x4a" + _key_value(key, value))
    return found


def _span(span: Span) -> bytes:
    """A ScopeSpans' 2:2 Span field. (Fields may come in any order; these come as they pack best.)"""
    name, trace, span_id, parent, start, end, attributes, kind, error, remote = span
    if parent is None:
        ids = _ROOT.pack(0x0A, 16, trace.to_bytes(16, "big"), 0x12, 8, span_id)
    else:
        ids = _CHILD.pack(0x0A, 16, trace.to_bytes(16, "big"), 0x12, 8, span_id, 0x22, 8, parent)
    tail = _TAIL.pack(0x30, _KINDS[kind], 0x39, start, 0x41, end, 0x0185, _FLAGS[remote])
    body = ids + _string(b"\x2a", name) + tail
    if attributes:
        for key, value in attributes.items():
            body += _attribute(key, value)
    if error:
        body += _ERROR
    return b"\x12" + _varint(len(body)) + body


def encode(spans: Iterable[Span], service_name: str) -> bytes:
    """`spans` of the service `service_name` as the body of one OTLP/HTTP export request.

    >>> body = encode([("GET", 1, 2, None, 10, 20, {"n": 1}, "server", False, False)], "svc")
    >>> body[:2].hex(), len(body)  # 1:2 ResourceSpans, 108 bytes long
    ('0a6c', 110)
    """
    return request_body([encode_spans(spans)], service_name)


def encode_spans(spans: Iterable[Span]) -> bytes:
    """`spans` as a ScopeSpans' Span fields, to be sent by `request_body`."""
    return b"".join(map(_span, spans))


def request_body(encoded: Iterable[bytes], service_name: str) -> bytes:
    """The body of one export request: the spans `encode_spans` wrote, of the service `service_name`."""
    resource = b"\x0a" + _key_value("service.name", service_name)  # Resource's 1:2 KeyValue
    scope_spans = b"\x0a\x09\x0a\x07edgegen" + b"".join(encoded)  # 1:2 scope { 1:2 name }
    resource_spans = (
        b"\x0a" + _varint(len(resource)) + resource + b"\x12" + _varint(len(scope_spans)) + scope_spans
    )
    return b"\x0a" + _varint(len(resource_spans)) + resource_spans


class SpanExporter:
    """Spans queued by the serving code, sent from a thread of their own to the OTLP/HTTP `endpoint`.

    At most `max_queue` spans wait; past that a span is dropped and counted (`dropped`) rather than block
    the loop or grow without bound (a collector that is down must not cost a node its memory). Spans a
    request failed to deliver are counted in `lost`.

    >>> exporter = SpanExporter("http://127.0.0.1:4318/v1/traces", "edgegen-node")
    >>> exporter.export(("GET", 1, 2, None, 10, 20, None, "server", False, False))
    >>> exporter.close()  # what is queued is sent (or counted lost) first
    """

    def __init__(
        self,
        endpoint: str,
        service_name: str,
        *,
        schedule_delay: float = 1.0,
        max_queue: int = 8192,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"an OTLP/HTTP endpoint is an http:// or https:// URL, got {endpoint!r}")
        self.endpoint, self.service_name = endpoint, service_name
        self._host, self._port, self._timeout, self._delay = url.hostname, url.port, timeout, schedule_delay
        # https: `tls` (observe/tracing.py: the CA and client certificate [tracing] names), else the
        # system's trusted CAs; the collector's name is checked either way
        self._tls = (tls or ssl.create_default_context()) if url.scheme == "https" else None
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        # `headers`: what the collector asks of a sender (an API key): sent, never logged
        self._headers = {**(headers or {}), "Content-Type": "application/x-protobuf"}
        self._connection: http.client.HTTPConnection | None = None
        self._max_queue = max_queue
        self._queue: collections.deque[Span] = collections.deque(maxlen=max_queue)
        self.dropped = self.lost = 0
        self._dropped_said = self._lost_said = 0
        self._drops_quiet_until = self._losses_quiet_until = 0.0
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="edgegen-otlp", daemon=True)
        self._thread.start()

    def export(self, span: Span) -> None:
        """Queue a span that is over; never blocks (called on the serving loop)."""
        queue = self._queue
        if len(queue) >= self._max_queue:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) == BATCH:
            self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, waiting `timeout` at most, and stop the thread."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        timer = False  # what woke the thread: the timer (send all that waits) or a full batch (send those)
        while True:
            closing = self._closing  # read before the last drain: what was queued before close() leaves
            try:
                self._send_waiting(everything=timer or closing)
            except Exception:  # observability never breaks serving, nor stops sending
                log.exception("spans could not be sent", extra={"endpoint": self.endpoint})
            if closing:
                break
            timer = not self._wake.wait(self._delay)
            self._wake.clear()
        if self._connection is not None:
            self._connection.close()

    def _send_waiting(self, everything: bool) -> None:
        """Send the spans waiting now: all of them, or (not `everything`) the full batches among them.
        Spans that come while these are sent wait for the next full batch or the timer: sending them at
        once, a few at a time, cost a request (~300 µs of CPU) per few answers at a high rate, ten times
        what encoding their spans costs."""
        queue = self._queue
        waiting = len(queue) if everything else len(queue) // BATCH * BATCH
        while waiting > 0:
            count, encoded = min(waiting, BATCH), []
            waiting -= count
            for start in range(0, count, SLICE):
                taken = [queue.popleft() for _ in range(min(SLICE, count - start))]  # (only this thread pops)
                encoded.append(encode_spans(taken))
                time.sleep(0)  # the GIL let go: the serving loop runs before the next slice
            self._post(request_body(encoded, self.service_name), count)
        now = time.monotonic()
        if self.dropped > self._dropped_said and now >= self._drops_quiet_until:
            log.warning(
                "spans dropped: more were waiting to be sent than the queue holds",
                extra={"endpoint": self.endpoint, "spans": self.dropped - self._dropped_said},
            )
            self._dropped_said, self._drops_quiet_until = self.dropped, now + QUIET_S

    def _post(self, body: bytes, spans: int) -> None:
        """POST one request; a kept-alive connection that has gone stale is opened again once."""
        for _ in range(2):
            reused = self._connection is not None
            try:
                if self._connection is None:
                    self._connection = self._connect()
                self._connection.request("POST", self._path, body, self._headers)
                response = self._connection.getresponse()
                response.read()  # (the connection is reused only once the answer is read)
            except (OSError, http.client.HTTPException) as exc:
                if self._connection is not None:
                    self._connection.close()
                self._connection = None
                problem = f"{type(exc).__name__}: {exc}"
                if reused:
                    continue
                break
            if 200 <= response.status < 300:
                return
            problem = f"HTTP {response.status}"
            break
        self.lost += spans
        now = time.monotonic()
        if now >= self._losses_quiet_until:
            log.warning(
                "spans could not be sent",
                extra={"endpoint": self.endpoint, "error": problem, "spans": self.lost - self._lost_said},
            )
            self._lost_said, self._losses_quiet_until = self.lost, now + QUIET_S

    def _connect(self) -> http.client.HTTPConnection:
        if self._tls is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._tls
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
