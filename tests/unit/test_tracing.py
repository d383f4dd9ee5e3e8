"""W3C `traceparent` as a hostile client may send it, and what tracing off leaves: the trace id in the logs,
nothing of OpenTelemetry's SDK."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from edgegen.http.boundary import read_head
from edgegen.observe import tracing
from edgegen.observe.logs import JsonFormatter, trace_id
from edgegen.observe.tracing import TraceParent, parse_traceparent
from tests.e2e.test_tracing import receiving

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


def test_opentelemetrys_sdk_is_imported_only_by_a_process_that_traces() -> None:
    code = (
        "import sys; from edgegen.observe import tracing;"
        "tracing.configure('', 'edgegen-node', 1.0); off = 'opentelemetry.sdk' in sys.modules;"
        "tracing.configure('http://127.0.0.1:9/v1/traces', 'edgegen-node', 1.0);"
        "on = 'opentelemetry.sdk' in sys.modules and tracing.tracer is not None;"
        "tracing.configure('', 'edgegen-node', 1.0); print(off, on, tracing.tracer)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True", "None"]


def test_an_endpoint_without_the_sdk_installed_fails_at_start_saying_what_to_install() -> None:
    code = (
        "import sys, importlib.abc\n"
        "class Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith(('opentelemetry.sdk', 'opentelemetry.exporter')):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        "from edgegen.errors import ConfigError\n"
        "from edgegen.observe import tracing\n"
        "try:\n"
        "    tracing.configure('http://127.0.0.1:9/v1/traces', 'edgegen-node', 1.0)\n"
        "except ConfigError as exc:\n"
        "    print(exc.message, tracing.tracer)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'edgegen[tracing]'" in result.stdout
    assert result.stdout.strip().endswith("None")


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
