"""The fleet's logs in one place: a node ships its lines to the gateway, a node cut off from the gateway
spools them and sends them once it is back, `edgegen logs query` finds them, and an error spike in a
node's access lines raises an alert."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import GatewayProcess, NodeProcess, free_port, metric, running

T = TypeVar("T")


def gateway_process(root: Path, node_url: str, port: int) -> GatewayProcess:
    config = root / "gateway.toml"
    config.write_text(
        f'[[nodes]]\nurl = "{node_url}"\nname = "n0"\n'
        "[health]\ninterval_s = 0.2\ntimeout_s = 0.5\n"
        "[alerts]\nwindow_s = 3\nbaseline_s = 30\nevaluate_s = 0.2\nmin_requests = 10\n"
    )
    return GatewayProcess(root, "--config", str(config), port=port)


@pytest.fixture(scope="module")
def setup(
    node_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[NodeProcess, GatewayProcess]]:
    gateway_port, node_port = free_port(), free_port()
    env = {**LLM_ENV, "EDGEGEN_LOGS__SHIP_TO": f"http://127.0.0.1:{gateway_port}", "EDGEGEN_LOGS__NODE": "n0",
           "EDGEGEN_LOGS__INTERVAL_S": "0.1", "EDGEGEN_LLM__TIMEOUT_S": "0.1"}  # fmt: skip
    node = NodeProcess(node_home, env=env, port=node_port)
    gateway = gateway_process(tmp_path_factory.mktemp("gateway"), node.url, gateway_port)
    with running(node), running(gateway):
        yield node, gateway


def until(found: Callable[[], T], timeout: float = 15) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := found():
            return value
        time.sleep(0.1)
    raise AssertionError("not found in time")


def lines(gateway: GatewayProcess, **params: Any) -> list[dict[str, Any]]:
    answer = httpx.get(f"{gateway.url}/gateway/logs", params={"limit": 1000, **params})
    assert answer.status_code == 200, answer.text
    return answer.json()["lines"]  # type: ignore[no-any-return]


def logs_query(gateway: GatewayProcess, *args: str) -> str:
    """What `edgegen logs query --gateway URL ARGS…` prints."""
    command = [sys.executable, "-m", "edgegen", "logs", "query", "--gateway", gateway.url, *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def test_a_request_is_found_by_its_id(setup: tuple[NodeProcess, GatewayProcess]) -> None:
    _, gateway = setup
    sent = httpx.post(
        f"{gateway.url}/predict", json={"input_data": [1.0] * 64}, headers={"X-Request-Id": "req-one"}
    )
    assert sent.status_code == 200
    [line] = until(lambda: lines(gateway, request_id="req-one"))
    assert (line["node"], line["status"], line["model"], line["logger"]) == (
        "n0",
        200,
        "digits",
        "edgegen.access",
    )
    printed = logs_query(gateway, "--request-id", "req-one", "--json")
    assert [json.loads(x)["request_id"] for x in printed.splitlines()] == ["req-one"]
    text = logs_query(gateway, "--request-id", "req-one")
    assert "n0" in text
    assert "request_id=req-one" in text
    assert lines(gateway, node="n0", text="node ready")  # the node's own log lines came too
    assert lines(gateway, text="HTTP Request") == []  # not the shipper's own requests, line after line


def test_a_trace_is_found_by_its_id(setup: tuple[NodeProcess, GatewayProcess]) -> None:
    """A client's `traceparent` goes through the gateway (tracing off, unchanged) to the node, whose
    access line carries its trace id; `edgegen logs query --trace-id` finds it among the fleet's lines."""
    _, gateway = setup
    trace = "0af7651916cd43dd8448eb211c80319c"
    for n in range(2):
        sent = httpx.post(
            f"{gateway.url}/predict",
            json={"input_data": [float(n)] * 64},
            headers={"traceparent": f"00-{trace}-b7ad6b716920333{n}-01", "X-Request-Id": f"traced-{n}"},
        )
        assert sent.status_code == 200
    found = until(lambda: len(got := lines(gateway, trace_id=trace)) == 2 and got)
    assert [(x["request_id"], x["trace_id"], x["node"]) for x in found] == [
        ("traced-0", trace, "n0"),
        ("traced-1", trace, "n0"),
    ]
    printed = logs_query(gateway, "--trace-id", trace, "--json")
    assert [json.loads(x)["request_id"] for x in printed.splitlines()] == ["traced-0", "traced-1"]
    for bad in ("0AF7651916CD43DD8448EB211C80319C", trace[:-1], trace + "0", "' OR 1=1 --", "x" * 5000):
        answer = httpx.get(f"{gateway.url}/gateway/logs", params={"trace_id": bad})
        assert answer.status_code == 400, answer.text
        assert "trace_id" in answer.json()["error"]
    answer = httpx.get(f"{gateway.url}/gateway/logs", params={"request_id": "a b"})
    assert answer.status_code == 400, answer.text  # what the boundary would never have taken as an id


def test_the_gateways_own_lines_are_kept_beside_the_nodes(setup: tuple[NodeProcess, GatewayProcess]) -> None:
    _, gateway = setup
    added = httpx.post(f"{gateway.url}/gateway/nodes", json={"name": "brief", "url": "http://127.0.0.1:9"})
    assert added.status_code == 201
    httpx.delete(f"{gateway.url}/gateway/nodes/brief").raise_for_status()
    [line] = until(lambda: lines(gateway, node="gateway", text="node added"))
    assert (line["node"], line["logger"], line["fleet_node"]) == ("gateway", "edgegen.gateway", "brief")
    assert until(lambda: lines(gateway, node="gateway", text="node removed"))
    assert all(line["node"] == "n0" for line in lines(gateway, node="n0"))


def test_lines_from_a_cut_off_node_arrive_after_it_reconnects(
    setup: tuple[NodeProcess, GatewayProcess],
) -> None:
    node, gateway = setup
    gateway.stop()
    for i in range(30):
        headers = {"X-Request-Id": f"cut-{i}"}
        assert httpx.post(
            f"{node.url}/predict", json={"input_data": [float(i)] * 64}, headers=headers
        ).is_success
    time.sleep(1.0)  # the shipper tries, fails, and keeps the lines
    gateway.start()

    def all_cut() -> list[dict[str, Any]]:
        got = [x for x in lines(gateway, text="cut") if x.get("request_id", "").startswith("cut-")]
        return got if len(got) == 30 else []

    arrived = until(all_cut)
    assert [x["request_id"] for x in arrived] == [f"cut-{i}" for i in range(30)]  # in the order they happened
    seqs = [x["seq"] for x in arrived]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 30  # each once


def test_an_error_spike_raises_an_alert(setup: tuple[NodeProcess, GatewayProcess]) -> None:
    node, gateway = setup

    def chat(max_tokens: int) -> int:
        messages = [{"role": "user", "content": "hi"}]
        body = {"model": "tiny-llm", "messages": messages, "max_tokens": max_tokens, "temperature": 0.8}
        return httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=30).status_code

    assert [chat(1) for _ in range(30)].count(200) >= 27  # the normal: quick answers
    time.sleep(3.2)  # those are the baseline now
    with ThreadPoolExecutor(8) as pool:
        # Past the node's 0.1 s deadline, and within 2048 tokens beside the template's system turn.
        statuses = list(pool.map(chat, [1900] * 16))
    assert statuses.count(504) >= 12
    alert = until(lambda: [a for a in httpx.get(f"{gateway.url}/gateway/alerts").json()["active"]
                           if a["kind"] == "error_spike"])[0]  # fmt: skip
    assert (alert["node"], alert["model"]) == ("n0", "tiny-llm")
    assert alert["error_rate"] >= 0.5
    assert metric(gateway, 'edgegen_gateway_alert_active{kind="error_spike",model="tiny-llm",node="n0"}') == 1
    assert metric(gateway, 'edgegen_gateway_alerts_total{kind="error_spike"}') >= 1
    assert '"alert raised"' in gateway.log()
