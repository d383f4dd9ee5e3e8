"""Traces across the hops: a client's `traceparent` through a real gateway into a real node and its
scheduler, and into a job worker; the spans sent over OTLP/HTTP to a receiver on loopback, which decodes
them with OpenTelemetry's own protobuf classes."""

from __future__ import annotations

import contextlib
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from edgegen.security.pki import Pki
from edgegen.security.settings import TlsSettings
from edgegen.security.transport import server_context
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import GatewayProcess, NodeProcess, assert_no_errors
from tests.e2e.test_gateway import gateway_config, node_home
from tests.threaded import serving

pytestmark = pytest.mark.e2e
SLACK_NS = 5_000_000  # clocks of two processes on one machine: a few ms apart at most
EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # spans leave each process within 50 ms


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start: int
    end: int
    attributes: dict[str, object]


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, decoded; with `tls`, an https one."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    receiver.spans += decoded(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def trace(self, trace_id: str, until: set[str], timeout: float = 15) -> list[Span]:
        """The spans of `trace_id`, once every name in `until` is among them."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [s for s in self.spans if s.trace_id == trace_id]
            if until <= {s.name for s in found} or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def decoded(request: ExportTraceServiceRequest) -> list[Span]:
    spans = []
    for resource in request.resource_spans:
        service = next(a.value.string_value for a in resource.resource.attributes if a.key == "service.name")
        for scope in resource.scope_spans:
            for s in scope.spans:
                attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes}
                spans.append(
                    Span(
                        service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        s.start_time_unix_nano, s.end_time_unix_nano, attributes,
                    )
                )  # fmt: skip
    return spans


@contextlib.contextmanager
def receiving(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    receiver = Receiver(tls)
    with serving(receiver.server):
        yield receiver


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[tuple[Receiver, NodeProcess, GatewayProcess]]:
    """A fleet whose collector is behind its own CA and wants a certificate of it (mutual TLS), as a
    fleet's would be: node and gateway send their spans over https with their own certificates."""
    root = tmp_path_factory.mktemp("traced")
    pki = Pki(root / "pki")
    pki.init()
    for name, kind in (("collector", "node"), ("node1", "node"), ("gw", "gateway")):
        pki.issue(name, kind)
    tls = TlsSettings(
        cert_file=pki.root / "collector.crt",
        key_file=pki.root / "collector.key",
        client_ca_file=pki.root / "ca.crt",
    )
    with receiving(server_context(tls)) as receiver:

        def exporting(prefix: str, name: str) -> dict[str, str]:
            files = {"CA_FILE": "ca.crt", "CERT_FILE": f"{name}.crt", "KEY_FILE": f"{name}.key"}
            env = {f"{prefix}TRACING__{key}": str(pki.root / file) for key, file in files.items()}
            return {**EXPORT, **env, f"{prefix}TRACING__ENDPOINT": receiver.url}

        env = {**LLM_ENV, **exporting("EDGEGEN_", "node1")}
        node = NodeProcess(node_home(root / "node", model_files), env=env)
        config = gateway_config(root / "gateway.toml", [node])
        gateway = GatewayProcess(root, "--config", str(config), env=exporting("EDGEGEN_GATEWAY_", "gw"))
        try:
            node.start()
            gateway.start()
            yield receiver, node, gateway
        finally:
            gateway.stop()
            node.stop()
        assert_no_errors(node)
        assert_no_errors(gateway)


def new_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def only(spans: list[Span], name: str, service: str) -> Span:
    found = [s for s in spans if s.name == name and s.service == service]
    assert len(found) == 1, (name, service, [(s.service, s.name) for s in spans])
    return found[0]


def within(child: Span, parent: Span) -> None:
    assert child.parent_id == parent.span_id, (child.name, parent.name)
    assert child.start <= child.end
    assert parent.start - SLACK_NS <= child.start, (child, parent)
    assert child.end <= parent.end + SLACK_NS, (child, parent)


def access_lines(process: NodeProcess, trace_id: str) -> list[dict[str, object]]:
    """The process's access lines of `trace_id` (flushed within 0.2 s of the request)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]
        found = [x for x in lines if x.get("logger") == "edgegen.access" and x.get("trace_id") == trace_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_one_chat_is_one_tree_across_gateway_node_and_scheduler(
    traced: tuple[Receiver, NodeProcess, GatewayProcess],
) -> None:
    receiver, node, gateway = traced
    trace_id, client_span, traceparent = new_traceparent()
    chat = {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    answer = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat, headers={"traceparent": traceparent}, timeout=60
    )
    assert answer.status_code == 200, answer.text

    spans = receiver.trace(trace_id, {"POST", "relay", "POST /v1/chat/completions", "llm.decode"})
    assert {s.trace_id for s in spans} == {trace_id}
    front = only(spans, "POST", "edgegen-gateway")  # a relayed request's span bears its method
    relay = only(spans, "relay", "edgegen-gateway")
    route = only(spans, "POST /v1/chat/completions", "edgegen-node")
    assert front.parent_id == client_span
    assert front.attributes["url.path"] == "/v1/chat/completions"
    within(relay, front)
    assert relay.attributes["edgegen.node"] == "n0"
    within(route, relay)
    assert route.attributes["http.response.status_code"] == 200
    assert route.attributes["edgegen.model"] == "tiny-llm"
    for name in ("cache.lookup", "llm.queue", "llm.prefill", "llm.decode"):
        within(only(spans, name, "edgegen-node"), route)
    queue, prefill, decode = (
        only(spans, n, "edgegen-node") for n in ("llm.queue", "llm.prefill", "llm.decode")
    )
    assert queue.end <= prefill.start <= prefill.end <= decode.start
    assert decode.attributes["edgegen.completion_tokens"] == answer.json()["usage"]["completion_tokens"]
    assert only(spans, "cache.lookup", "edgegen-node").attributes["edgegen.cache_hit"] is False

    # Both processes' access lines carry the trace id.
    for process in (gateway, node):
        lines = access_lines(process, trace_id)
        assert [x["path"] for x in lines] == ["/v1/chat/completions"], process.command


def test_a_job_runs_in_the_trace_of_the_request_that_queued_it(
    traced: tuple[Receiver, NodeProcess, GatewayProcess],
) -> None:
    receiver, _, gateway = traced
    trace_id, _, traceparent = new_traceparent()
    chat = {"model": "tiny-llm", "messages": [{"role": "user", "content": "a job"}], "max_tokens": 4}
    order = {"method": "POST", "url": "/v1/chat/completions", "body": chat}
    queued = httpx.post(f"{gateway.url}/v1/jobs", json=order, headers={"traceparent": traceparent})
    assert queued.status_code == 202, queued.text

    spans = receiver.trace(trace_id, {"POST /v1/jobs", "job.run", "llm.decode"})
    submitted = only(spans, "POST /v1/jobs", "edgegen-node")
    run = only(spans, "job.run", "edgegen-node")
    assert run.parent_id == submitted.span_id
    assert run.attributes["edgegen.job"] == queued.json()["id"]
    assert run.attributes["http.response.status_code"] == 200
    within(only(spans, "llm.decode", "edgegen-node"), run)


def test_a_fixed_shape_prediction_shows_its_wait_and_its_batch(
    traced: tuple[Receiver, NodeProcess, GatewayProcess],
) -> None:
    receiver, _, gateway = traced
    trace_id, _, traceparent = new_traceparent()
    answer = httpx.post(
        f"{gateway.url}/predict", json={"input_data": [0.0] * 64}, headers={"traceparent": traceparent}
    )
    assert answer.status_code == 200, answer.text

    spans = receiver.trace(trace_id, {"POST /predict", "batch.queue", "batch.forward"})
    route = only(spans, "POST /predict", "edgegen-node")
    wait, forward = only(spans, "batch.queue", "edgegen-node"), only(spans, "batch.forward", "edgegen-node")
    within(wait, route)
    within(forward, route)
    assert wait.end <= forward.start
    assert forward.attributes["edgegen.batch_rows"] == 1
