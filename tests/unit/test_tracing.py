"""W3C `traceparent` as a hostile client may send it; what tracing off leaves (the trace id in the logs); the
spans our own OTLP/HTTP exporter writes, decoded with OpenTelemetry's protobuf classes, and how it sends them
to a real HTTP server on loopback."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from pydantic import ValidationError

from edgegen.config import TracingSettings
from edgegen.errors import ConfigError
from edgegen.http.boundary import read_head
from edgegen.observe import otlp, tracing
from edgegen.observe.logs import JsonFormatter, trace_id
from edgegen.observe.tracing import TraceParent, parse_traceparent
from edgegen.security.pki import Pki
from edgegen.security.settings import TlsSettings
from edgegen.security.transport import server_context, subject_name
from tests.e2e.test_tracing import receiving
from tests.threaded import serving

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


def test_a_valid_traceparent_gives_its_trace_span_and_flags() -> None:
    assert parse_traceparent(VALID.encode()) == TraceParent(TRACE, SPAN, 1)
    assert parse_traceparent(VALID) == TraceParent(TRACE, SPAN, 1)
    assert parse_traceparent(f" {VALID}\t".encode()) == TraceParent(TRACE, SPAN, 1)  # optional whitespace
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00".encode()) == TraceParent(TRACE, SPAN, 0)
    assert TraceParent(TRACE, SPAN, 1).header() == VALID.encode()


def test_a_later_version_is_read_for_the_fields_it_shares_with_version_00() -> None:
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-what-comes-next".encode()) == TraceParent(TRACE, SPAN, 1)
    assert parse_traceparent(f"cc-{TRACE}-{SPAN}-01".encode()) == TraceParent(TRACE, SPAN, 1)


@pytest.mark.parametrize(
    "value",
    [
        f"ff-{TRACE}-{SPAN}-01",  # version ff is never valid
        f"00-{TRACE}-{SPAN}-01-more",  # version 00 has exactly four fields
        f"01-{TRACE}-{SPAN}-01more",  # a later version's extra fields follow a dash
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{SPAN}-01",  # uppercase hex
        f"0-{TRACE}-{SPAN}-01",
        f"00-{TRACE[:-1]}-{SPAN}-01",  # too short
        f"00-{TRACE}0-{SPAN}-01",  # too long a field
        f"00-{TRACE}-{SPAN}-1",
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE[:-1]}g-{SPAN}-01",  # not hex
        f"01-{TRACE}-{SPAN}-01-" + "x" * 600,  # over the length looked at
        f"00-{TRACE}-{SPAN}-01\x00",
        "",
        "duplicate",  # what the boundary makes of two traceparent headers
    ],
)
def test_a_traceparent_that_is_not_valid_is_none(value: str) -> None:
    assert parse_traceparent(value.encode()) is None


def test_not_utf8_is_none() -> None:
    assert parse_traceparent(b"00-\xff\xfe") is None
    assert parse_traceparent(None) is None


def test_the_boundary_reads_one_traceparent_and_counts_two_as_none() -> None:
    one = [(b"traceparent", VALID.encode())]
    assert read_head(one, 1024, 1024) == (None, VALID.encode(), None)
    _, twice, _ = read_head(one * 2, 1024, 1024)
    assert parse_traceparent(twice) is None


def test_off_a_valid_traceparent_puts_its_trace_id_in_the_log_lines_until_the_request_ends() -> None:
    assert tracing.tracer is None  # the default
    assert tracing.enter(None, "POST") is None
    assert tracing.enter(b"not-one", "POST") is None
    record = logging.LogRecord("edgegen.node", logging.INFO, __file__, 1, "served", (), None)
    entered = tracing.enter(VALID.encode(), "POST")
    assert entered is not None
    assert entered.span is None
    assert json.loads(JsonFormatter().format(record))["trace_id"] == TRACE
    entered.close("POST /predict", 200)
    assert trace_id.get() is None
    assert "trace_id" not in json.loads(JsonFormatter().format(record))


def test_off_a_queued_job_keeps_the_requests_own_valid_traceparent() -> None:
    assert tracing.submitter(f" {VALID}") == VALID
    assert tracing.submitter("nonsense") is None
    assert tracing.submitter(None) is None


def test_no_opentelemetry_package_is_imported_tracing_on_or_off() -> None:
    code = (
        "import sys; from edgegen.observe import tracing;"
        "tracing.configure('', 'edgegen-node', 1.0); off = [m for m in sys.modules if 'opentelemetry' in m];"
        "tracing.configure('http://127.0.0.1:9/v1/traces', 'edgegen-node', 1.0);"
        "on = tracing.tracer is not None;"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry', 'google.protobuf'))];"
        "tracing.configure('', 'edgegen-node', 1.0); print(off, on, loaded, tracing.tracer)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", "True", "[]", "None"]


def test_spans_still_queued_when_the_process_is_replaced_are_sent_first() -> None:
    """A restart or a software switch replaces the node's process (`exec`), which runs no `atexit`
    handler: the spans queued then (those of the requests the drain let finish) were lost. They leave
    before the exec now."""
    code = (
        "import sys, time; from edgegen.observe import tracing; from edgegen.http import serving;"
        "tracing.configure(sys.argv[1], 'edgegen-node', 1.0); t = tracing.tracer; ref = t.child_of(None);"
        "now = time.time_ns(); t.emit('POST /predict', ref, None, now, now + 1000, None, 'server');"
        "serving.replace_process(sys.executable, ['-c', 'pass'])"
    )
    with receiving() as receiver:
        subprocess.run([sys.executable, "-c", code, receiver.url], check=True, timeout=60)
        with receiver.lock:
            assert [span.name for span in receiver.spans] == ["POST /predict"]


def test_a_schedule_delay_that_is_not_milliseconds_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "soon")
    with pytest.raises(ConfigError, match="OTEL_BSP_SCHEDULE_DELAY"):
        tracing.configure("http://127.0.0.1:9/v1/traces", "edgegen-node", 1.0)
    assert tracing.tracer is None


def test_with_sample_ratio_0_only_the_traces_a_caller_sampled_are_sent() -> None:
    with receiving() as receiver:
        tracing.configure(receiver.url, "edgegen-node", 0.0)
        try:
            kept = tracing.enter(VALID.encode(), "POST")
            unsampled = tracing.enter(f"00-{'1' * 32}-{SPAN}-00".encode(), "POST")
            new = tracing.enter(None, "POST")
            assert None not in (kept, unsampled, new)
            assert (kept.trace_id, unsampled.trace_id) == (TRACE, "1" * 32)  # logged either way
            for entered in (new, unsampled, kept):
                entered.close("POST /predict", 200)
        finally:
            tracing.configure("", "edgegen-node", 0.0)  # off: what was batched is sent first
        assert tracing.tracer is None
        [span] = receiver.spans
    assert (span.trace_id, span.parent_id, span.name, span.service) == (
        TRACE,
        SPAN,
        "POST /predict",
        "edgegen-node",
    )


# Our own exporter (observe/otlp.py): its bytes read by OpenTelemetry's protobuf classes, its requests
# received by a real HTTP server on loopback.


@dataclass(frozen=True)
class Posted:
    path: str
    content_type: str
    api_key: str | None  # the header a collector would ask for
    client_port: int  # the same port twice: the same kept-alive connection
    request: ExportTraceServiceRequest
    client_cert: str | None = None  # the subject of the certificate the sender showed (https)

    @property
    def spans(self) -> list[PbSpan]:
        return [s for r in self.request.resource_spans for scope in r.scope_spans for s in scope.spans]


class Collector:
    """An OTLP/HTTP endpoint that keeps every request, answers `status` and, with `hang_up`, closes each
    connection after its answer without saying so (what a kept-alive connection gone stale looks like);
    with `tls`, an https one."""

    def __init__(self, status: int = 200, hang_up: bool = False, tls: ssl.SSLContext | None = None) -> None:
        self.posted: list[Posted] = []
        self.arrived = threading.Event()  # a request came (set each time)
        self.answer = threading.Event()  # cleared: a request's answer waits until it is set
        self.answer.set()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                content_type = self.headers["Content-Type"]
                api_key = self.headers["Api-Key"]
                shown = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
                client_cert = subject_name(shown) if shown else None
                posted = Posted(
                    self.path, content_type, api_key, self.client_address[1], request, client_cert
                )
                collector.posted.append(posted)
                collector.arrived.set()
                collector.answer.wait(5)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.close_connection = hang_up

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def spans(self) -> list[PbSpan]:
        return [s for p in self.posted for s in p.spans]


@contextlib.contextmanager
def collecting(
    status: int = 200, hang_up: bool = False, tls: ssl.SSLContext | None = None
) -> Iterator[Collector]:
    collector = Collector(status, hang_up, tls)
    with serving(collector.server):
        yield collector


def wait_for(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.01)


def a_span(n: int = 0, **attributes: Any) -> otlp.Span:
    return (f"span {n}", 1 << 100, n + 1, None, 1_000, 2_000, attributes or None, "internal", False, False)


def warnings_of(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "edgegen.tracing" and r.getMessage() == message]


NOW = time.time_ns()
EVERY_TYPE = {
    "str": "héllo ☃",
    "empty": "",
    "surrogate": "a\ud800b",  # not UTF-8 as it stands: replaced, not fatal to the batch
    "long": "x" * 200,  # its length is a varint of two bytes
    "true": True,
    "false": False,
    "int": 200,
    "zero": 0,
    "negative": -5,
    "int64 max": (1 << 63) - 1,
    "int64 min": -(1 << 63),
    "past int64": 1 << 64,
    "float": 0.25,
    "negative float": -1e300,
    "list": [1, 2],
    "none": None,
}
SPANS: list[otlp.Span] = [
    ("POST /predict", int(TRACE, 16), 0xA1, int(SPAN, 16), NOW, NOW + 5, EVERY_TYPE, "server", False, True),
    ("relay", int(TRACE, 16), 0xA2, 0xA1, NOW + 1, NOW + 4, {"edgegen.node": "n0"}, "client", True, False),
    ("job.run", 1, 0xFFFF_FFFF_FFFF_FFFF, None, NOW, NOW + 7, None, "consumer", True, False),
    ("n" * 300, (1 << 128) - 1, 1, None, 0, 0, {}, "internal", False, False),
]


def test_every_field_of_a_span_is_written_as_opentelemetrys_classes_read_it() -> None:
    body = otlp.encode(SPANS * 16, "edgegen-node")  # 64 spans
    # the exporter's thread encodes a batch slice by slice: the same bytes
    assert otlp.request_body(map(otlp.encode_spans, (SPANS, SPANS * 15)), "edgegen-node") == body
    request = ExportTraceServiceRequest.FromString(body)

    [resource] = request.resource_spans
    assert [(a.key, a.value.string_value) for a in resource.resource.attributes] == [
        ("service.name", "edgegen-node")
    ]
    [scope] = resource.scope_spans
    assert scope.scope.name == "edgegen"
    assert len(scope.spans) == 64
    for sent, got in zip(SPANS * 16, scope.spans, strict=True):
        name, trace, span, parent, start, end, attributes, kind, error, remote = sent
        assert got.name == name
        assert got.trace_id == trace.to_bytes(16, "big")
        assert got.span_id == span.to_bytes(8, "big")
        assert got.parent_span_id == (b"" if parent is None else parent.to_bytes(8, "big"))
        assert got.kind == getattr(PbSpan.SpanKind, f"SPAN_KIND_{kind.upper()}")
        assert (got.start_time_unix_nano, got.end_time_unix_nano) == (start, end)
        assert got.status.code == (Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_UNSET)
        assert got.status.message == ""
        assert got.flags == (0x301 if remote else 0x101)  # sampled; whether the parent is remote
        assert got.trace_state == ""
        assert len(got.events) == len(got.links) == got.dropped_attributes_count == 0
        assert len(got.attributes) == len(attributes or {})

    decoded = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in scope.spans[0].attributes}
    assert decoded == {
        **EVERY_TYPE,
        "surrogate": "a?b",
        "past int64": str(1 << 64),
        "list": "[1, 2]",
        "none": "None",
    }
    kinds = {a.key: a.value.WhichOneof("value") for a in scope.spans[0].attributes}
    assert kinds["true"] == kinds["false"] == "bool_value"
    assert kinds["int"] == kinds["zero"] == "int_value"
    assert kinds["float"] == "double_value"


def test_a_full_batch_leaves_at_once_and_close_sends_the_rest_over_the_same_connection() -> None:
    with collecting() as collector:
        exporter = otlp.SpanExporter(collector.url, "edgegen-node", schedule_delay=60)
        for n in range(otlp.BATCH):
            exporter.export(a_span(n))
        wait_for(lambda: len(collector.posted) == 1)  # long before the timer
        for n in range(3):
            exporter.export(a_span(n))
        exporter.close()
        assert len(collector.posted) == 2  # close() returned once they were answered
    first, second = collector.posted
    assert ([s.name for s in first.spans], len(second.spans)) == ([f"span {n}" for n in range(otlp.BATCH)], 3)
    assert (first.path, first.content_type) == ("/v1/traces", "application/x-protobuf")
    assert first.client_port == second.client_port
    assert exporter.lost == exporter.dropped == 0


def test_spans_that_come_while_a_batch_is_sent_wait_for_the_next_batch_or_the_timer() -> None:
    """At a high rate, sending them at once cost a request for every few answers (~300 µs of CPU each):
    the exporter's thread cost a node 40 µs an answer, where its spans' encoding costs ~15."""
    with collecting() as collector:
        exporter = otlp.SpanExporter(collector.url, "edgegen-node", schedule_delay=60)
        collector.answer.clear()
        for n in range(otlp.BATCH):
            exporter.export(a_span(n))
        assert collector.arrived.wait(5)  # the batch is being sent
        collector.arrived.clear()
        for n in range(3):
            exporter.export(a_span(n))
        collector.answer.set()
        assert not collector.arrived.wait(0.5)  # no request for the three
        exporter.close()  # but they leave before the exporter stops
    assert [len(p.spans) for p in collector.posted] == [otlp.BATCH, 3]


def test_the_timer_sends_what_waits() -> None:
    with collecting() as collector:
        exporter = otlp.SpanExporter(collector.url, "edgegen-node", schedule_delay=0.05)
        try:
            exporter.export(a_span())
            wait_for(lambda: len(collector.spans()) == 1)
        finally:
            exporter.close()


def test_a_connection_the_server_closed_is_opened_again() -> None:
    with collecting(hang_up=True) as collector:
        exporter = otlp.SpanExporter(collector.url, "edgegen-node", schedule_delay=60)
        for n in range(2 * otlp.BATCH):  # two requests: the second tries the first's connection first
            exporter.export(a_span(n))
        exporter.close()
    assert [len(p.spans) for p in collector.posted] == [otlp.BATCH, otlp.BATCH]
    assert exporter.lost == 0
    assert len({p.client_port for p in collector.posted}) == 2


def test_a_dead_endpoint_is_logged_once_a_minute_with_the_count_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "edgegen.tracing")  # whatever another test left the root's level at
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    exporter = otlp.SpanExporter(f"http://127.0.0.1:{port}/v1/traces", "edgegen-node", schedule_delay=60)
    for n in range(otlp.BATCH):
        exporter.export(a_span(n))
    wait_for(lambda: exporter.lost == otlp.BATCH)
    exporter.export(a_span())
    exporter.close()
    assert exporter.lost == otlp.BATCH + 1
    [warned] = warnings_of(caplog, "spans could not be sent")  # the second failure, within the minute: quiet
    assert warned.spans == otlp.BATCH  # type: ignore[attr-defined]
    assert "ConnectionRefusedError" in warned.error  # type: ignore[attr-defined]


def test_an_error_answer_counts_the_spans_lost(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "edgegen.tracing")
    with collecting(status=503) as collector:
        exporter = otlp.SpanExporter(collector.url, "edgegen-node", schedule_delay=60)
        exporter.export(a_span())
        exporter.close()
    assert (len(collector.spans()), exporter.lost) == (1, 1)
    [warned] = warnings_of(caplog, "spans could not be sent")
    assert warned.error == "HTTP 503"  # type: ignore[attr-defined]


def test_a_full_queue_drops_and_counts_what_does_not_fit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "edgegen.tracing")
    with collecting() as collector:
        exporter = otlp.SpanExporter(collector.url, "edgegen-node", schedule_delay=60, max_queue=3)
        for n in range(5):
            exporter.export(a_span(n))
        assert exporter.dropped == 2
        exporter.close()
    assert [s.name for s in collector.spans()] == ["span 0", "span 1", "span 2"]
    [warned] = warnings_of(caplog, "spans dropped: more were waiting to be sent than the queue holds")
    assert warned.spans == 2  # type: ignore[attr-defined]


def test_an_endpoint_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        otlp.SpanExporter("grpc://127.0.0.1:4317", "edgegen-node")


def test_the_tracers_spans_carry_their_kind_parent_flags_and_status() -> None:
    with collecting() as collector:
        tracing.configure(collector.url, "edgegen-gateway", 1.0)
        try:
            assert tracing.tracer is not None
            entered = tracing.enter(VALID.encode(), "POST", {"url.path": "/predict"})
            assert entered is not None
            child = tracing.tracer.span("cache.lookup")
            child.set_attribute("edgegen.cache_hit", True)
            child.end()
            relay, traceparent = tracing.tracer.relay()
            relay.end()
            entered.close("POST /predict", 503, {"edgegen.model": "digits", "edgegen.none": None})
            job = tracing.enter(None, "job.run", job=True)
            assert job is not None
            job.close(None, 200)
        finally:
            tracing.configure("", "edgegen-gateway", 1.0)  # off: what was queued is sent first
    spans = {s.name: s for s in collector.spans()}
    route, lookup, relayed, run = (spans[n] for n in ("POST /predict", "cache.lookup", "relay", "job.run"))
    assert (route.trace_id.hex(), route.parent_span_id.hex(), route.flags) == (TRACE, SPAN, 0x301)
    assert (route.kind, route.status.code) == (PbSpan.SPAN_KIND_SERVER, Status.STATUS_CODE_ERROR)
    assert {a.key for a in route.attributes} == {"url.path", "http.response.status_code", "edgegen.model"}
    for below in (lookup, relayed):
        assert (below.trace_id, below.parent_span_id, below.flags) == (route.trace_id, route.span_id, 0x101)
        assert below.status.code == Status.STATUS_CODE_UNSET
    assert lookup.kind == PbSpan.SPAN_KIND_INTERNAL
    assert [(a.key, a.value.bool_value) for a in lookup.attributes] == [("edgegen.cache_hit", True)]
    assert relayed.kind == PbSpan.SPAN_KIND_CLIENT
    assert traceparent == f"00-{TRACE}-{relayed.span_id.hex()}-01".encode()
    assert (run.kind, run.parent_span_id, run.flags) == (PbSpan.SPAN_KIND_CONSUMER, b"", 0x101)
    assert run.trace_id != route.trace_id


def test_the_collectors_headers_come_from_opentelemetrys_variables() -> None:
    assert tracing.export_headers({}) == {}
    both = {
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=general",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "Api-Key=t%2Cr",
    }
    assert tracing.export_headers(both) == {"api-key": "t,r"}  # the traces' own wins; values percent-decoded
    many = {"OTEL_EXPORTER_OTLP_HEADERS": " x-tenant = acme , authorization=Bearer%20s3cr3t"}
    assert tracing.export_headers(many) == {"x-tenant": "acme", "authorization": "Bearer s3cr3t"}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("api-key", "pair 1 is not name=value"),
        ("ok=1,bad name=s3cr3t", "pair 2 is not name=value"),
        ("api-key=", "empty"),
        ("api-key=s3cr3t%0D%0AX-Injected: 1", "characters a header may not"),  # a second header smuggled in
        ("api-key=s3cr3t%00", "characters a header may not"),
        ("content-type=s3cr3t", "set by the exporter itself"),
        ("host=s3cr3t", "set by the exporter itself"),
    ],
)
def test_a_variable_that_is_not_headers_fails_the_start_without_showing_its_values(
    value: str, why: str
) -> None:
    with pytest.raises(ConfigError, match=why) as refused:
        tracing.export_headers({"OTEL_EXPORTER_OTLP_HEADERS": value})
    assert "s3cr3t" not in str(refused.value)


def test_the_exporter_sends_the_collectors_headers() -> None:
    with collecting() as collector:
        exporter = otlp.SpanExporter(collector.url, "edgegen-node", headers={"api-key": "s3cr3t"})
        exporter.export(a_span())
        exporter.close()
    assert [(p.api_key, p.content_type) for p in collector.posted] == [("s3cr3t", "application/x-protobuf")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A collector's certificate and a node's, from the fleet's CA (the project's own tools)."""
    made = Pki(tmp_path_factory.mktemp("pki"))
    made.init()
    made.issue("collector", "node")
    made.issue("node1", "node")
    return made.root


def traced_over(collector: Collector, **files: Path) -> None:
    """One span sent to `collector` by a tracer configured with `files` ([tracing]'s TLS files)."""
    tracing.configure(collector.url, "edgegen-node", 1.0, **files)
    try:
        assert tracing.tracer is not None
        tracing.tracer.span("cache.lookup").end()
    finally:
        tracing.configure("", "edgegen-node", 1.0)  # off: what was queued is sent (or counted lost) first


def test_an_https_collector_of_the_fleets_ca_gets_the_spans_and_the_nodes_certificate(pki: Path) -> None:
    """A collector behind the fleet's own CA that wants client certificates (mutual TLS): the exporter
    checks it against `ca_file` and shows `cert_file`."""
    tls = TlsSettings(
        cert_file=pki / "collector.crt", key_file=pki / "collector.key", client_ca_file=pki / "ca.crt"
    )
    with collecting(tls=server_context(tls)) as collector:
        files = {"ca_file": pki / "ca.crt", "cert_file": pki / "node1.crt", "key_file": pki / "node1.key"}
        traced_over(collector, **files)
    assert [(p.client_cert, [s.name for s in p.spans]) for p in collector.posted] == [
        ("OU=node,CN=node1", ["cache.lookup"])
    ]


@pytest.mark.parametrize(
    "files",
    [
        {},  # the system's CAs: the fleet's is not among them
        {"ca_file": "ca.crt"},  # no certificate to show a collector that wants one
    ],
)
def test_a_collector_the_exporter_cannot_trust_or_that_refuses_it_costs_the_spans(
    pki: Path, files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    tls = TlsSettings(
        cert_file=pki / "collector.crt", key_file=pki / "collector.key", client_ca_file=pki / "ca.crt"
    )
    with (
        caplog.at_level(logging.WARNING, "edgegen.tracing"),
        collecting(tls=server_context(tls)) as collector,
    ):
        traced_over(collector, **{k: pki / v for k, v in files.items()})
    assert collector.posted == []
    [lost] = warnings_of(caplog, "spans could not be sent")
    assert lost.__dict__["spans"] == 1


def test_tls_files_that_do_not_load_fail_the_start(pki: Path, tmp_path: Path) -> None:
    url = "https://127.0.0.1:9/v1/traces"
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate")
    for files in (
        {"ca_file": tmp_path / "missing.crt"},
        {"ca_file": not_pem},
        {"cert_file": pki / "node1.crt", "key_file": pki / "collector.key"},  # a key of another certificate
    ):
        with pytest.raises(ConfigError, match=r"\[tracing\] ca_file, cert_file or key_file does not load"):
            tracing.configure(url, "edgegen-node", 1.0, **files)
        assert tracing.tracer is None


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        (
            {"endpoint": "https://c:4318/v1/traces", "cert_file": "a.crt"},
            "cert_file and key_file go together",
        ),
        ({"endpoint": "http://c:4318/v1/traces", "ca_file": "ca.crt"}, "for an https:// endpoint"),
        ({"ca_file": "ca.crt"}, "for an https:// endpoint"),
    ],
)
def test_tracing_tls_settings_are_checked_at_start(fields: dict[str, str], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        TracingSettings(**fields)
