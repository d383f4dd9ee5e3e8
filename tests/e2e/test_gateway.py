"""`edgegen gateway` in front of three real nodes: one address for the seed, KServe and OpenAI protocols."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from edgegen import __version__
from tests.conftest import fill_store
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import (
    YOUNG_COLLECTIONS,
    GatewayProcess,
    NodeProcess,
    assert_no_errors,
    metric,
    predict_together,
)
from tests.llm_models import write_tiny_llama

pytestmark = pytest.mark.e2e
PIXELS = np.random.default_rng(0).integers(0, 17, (64,)).astype(float).tolist()


def node_home(root: Path, model_files: dict[str, Path]) -> Path:
    root.mkdir()
    store = fill_store(root / "models", model_files)
    store.add(write_tiny_llama(root / "tiny.gguf"), "tiny-llm", task="text-generation")
    return root


def gateway_config(path: Path, nodes: list[NodeProcess], extra: str = "") -> Path:
    lines = [f'[[nodes]]\nurl = "{n.url}"\nname = "n{i}"\n' for i, n in enumerate(nodes)]
    path.write_text(
        "".join(lines)
        + '[balancer]\ndefault = "least_connections"\n'
        + 'routes = { "/v1/chat/completions" = "prefix_affinity" }\n'
        + "[health]\ninterval_s = 0.2\ntimeout_s = 0.5\nstatus_interval_s = 0.2\n"
        + extra
    )
    return path


@contextlib.contextmanager
def running_fleet(
    root: Path, model_files: dict[str, Path], n: int = 3, env: dict[str, str] = LLM_ENV
) -> Iterator[list[NodeProcess]]:
    """`n` real nodes, each with its own home holding digits and a tiny LLM; always stopped."""
    nodes = [NodeProcess(node_home(root / f"node{i}", model_files), env=env) for i in range(n)]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@contextlib.contextmanager
def running_gateway(
    root: Path, nodes: list[NodeProcess], extra: str = "", *flags: str
) -> Iterator[GatewayProcess]:
    config = gateway_config(root / "gateway.toml", nodes, extra)
    process = GatewayProcess(root, "--config", str(config), *flags).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[list[NodeProcess]]:
    with running_fleet(tmp_path_factory.mktemp("fleet"), model_files) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fleet: list[NodeProcess]) -> Iterator[GatewayProcess]:
    with running_gateway(tmp_path_factory.mktemp("gateway"), fleet) as process:
        yield process
    assert_no_errors(process)


def test_the_seed_request_through_the_gateway_is_the_nodes_answer(
    gateway: GatewayProcess, fleet: list[NodeProcess]
) -> None:
    direct = httpx.post(f"{fleet[0].url}/predict", json={"input_data": PIXELS}).json()
    answers = [httpx.post(f"{gateway.url}/predict", json={"input_data": PIXELS}) for _ in range(9)]
    assert all(a.status_code == 200 for a in answers)
    assert all(a.json() == direct for a in answers)
    # Least connections with equal loads takes turns: every node served some.
    assert Counter(a.headers["x-edgegen-node"] for a in answers) == {"n0": 3, "n1": 3, "n2": 3}


def wait_job(client: httpx.Client, job_id: str) -> httpx.Response:
    for _ in range(600):
        answer = client.get(f"/v1/jobs/{job_id}")
        if answer.status_code != 200 or answer.json()["status"] in ("succeeded", "failed", "cancelled"):
            return answer
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_jobs_are_found_on_the_node_that_holds_them(
    gateway: GatewayProcess, fleet: list[NodeProcess], tmp_path: Path
) -> None:
    """Each node keeps its own jobs (SQLite): the gateway sends a job's GET and DELETE to its node, those
    it saw submitted at once, the others (sent to a node directly, or before a gateway restart) by asking
    the nodes in turn."""
    order = {"method": "POST", "url": "/predict", "body": {"input_data": PIXELS}}
    expected = httpx.post(f"{fleet[0].url}/predict", json={"input_data": PIXELS}).json()
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        through = [client.post("/v1/jobs", json=order) for _ in range(6)]
        homes = {r.json()["id"]: r.headers["x-edgegen-node"] for r in through}
        homes |= {
            httpx.post(f"{n.url}/v1/jobs", json=order).json()["id"]: f"n{i}" for i, n in enumerate(fleet)
        }
        assert len(set(homes.values())) == 3
        for job_id, home in homes.items():
            found = wait_job(client, job_id)
            assert found.status_code == 200, found.text
            assert found.headers["x-edgegen-node"] == home
            assert found.json()["response"] == {"status_code": 200, "body": expected}
        cancelled = client.delete(f"/v1/jobs/{next(iter(homes))}")  # finished already: its state, unchanged
        assert (cancelled.status_code, cancelled.json()["status"]) == (200, "succeeded")
        assert client.get(f"/v1/jobs/job_{'0' * 24}").status_code == 404
        assert client.get("/v1/jobs/not-a-job-id").status_code == 400
    with running_gateway(tmp_path, fleet) as fresh, httpx.Client(base_url=fresh.url, timeout=30) as client:
        for job_id, home in homes.items():  # a gateway that saw none of them
            found = client.get(f"/v1/jobs/{job_id}")
            assert (found.status_code, found.headers["x-edgegen-node"]) == (200, home)


def test_a_job_submitted_again_with_its_idempotency_key_is_the_same_job_whichever_the_load(
    gateway: GatewayProcess,
) -> None:
    """Each node keeps its own jobs and its own Idempotency-Keys (SQLite). A client sends its order again
    with the same key (it is unsure the first try got through): through the gateway it reaches the node
    that has the key, whatever the balancer would choose, and gets the job it made. Before, least
    connections spread the tries over the nodes: three jobs, run three times."""
    order = {"method": "POST", "url": "/predict", "body": {"input_data": PIXELS}}
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for key in ("order-17", "order-18"):
            tries = [client.post("/v1/jobs", json=order, headers={"Idempotency-Key": key}) for _ in range(6)]
            assert {t.status_code for t in tries} <= {200, 202}
            assert len({t.json()["id"] for t in tries}) == 1
            assert len({t.headers["x-edgegen-node"] for t in tries}) == 1
        plain = {client.post("/v1/jobs", json=order).headers["x-edgegen-node"] for _ in range(6)}
        assert len(plain) > 1  # without a key, the balancer spreads them as before


def test_a_job_on_a_node_out_of_rotation_is_a_503_to_retry_not_a_job_lost(
    gateway: GatewayProcess, fleet: list[NodeProcess]
) -> None:
    """n1 holds a job (its own SQLite queue) and is drained. A gateway that never saw the job submitted (a
    restarted one, or another worker of `--workers N`: each knows the submissions it relayed) asks the
    nodes in rotation, which have no such job: it answers 503, to retry, since n1 was not asked. Before,
    it relayed their 404, and a client would take its job for lost and submit it again."""
    order = {"method": "POST", "url": "/predict", "body": {"input_data": PIXELS}}
    job_id = httpx.post(f"{fleet[1].url}/v1/jobs", json=order).json()["id"]
    admin = f"{gateway.url}/gateway/nodes"
    assert httpx.patch(f"{admin}/n1", json={"draining": True}).json()["draining"] is True
    try:
        away = httpx.get(f"{gateway.url}/v1/jobs/{job_id}")
        assert away.status_code == 503
        assert "1 could not be asked" in away.json()["error"]["message"]
    finally:
        httpx.patch(f"{admin}/n1", json={"draining": False})
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        found = wait_job(client, job_id)
    assert (found.status_code, found.headers["x-edgegen-node"]) == (200, "n1")


def test_a_job_in_a_shared_redis_queue_is_read_from_another_node_while_its_own_is_away(
    tmp_path: Path, model_files: dict[str, Path], redis_url: str
) -> None:
    """Two nodes share one Redis queue: a job outlives the node that accepted it. That node drained, the
    gateway that relayed the submission asks the other, which has the job too. Before, it answered 503
    at once, its home being away, asking nobody."""
    env = {**LLM_ENV, "EDGEGEN_JOBS__BACKEND": "redis", "EDGEGEN_JOBS__REDIS_URL": redis_url}
    order = {"method": "POST", "url": "/predict", "body": {"input_data": PIXELS}}
    with (
        running_fleet(tmp_path, model_files, n=2, env=env) as nodes,
        running_gateway(tmp_path, nodes) as gateway,
        httpx.Client(base_url=gateway.url, timeout=30) as client,
    ):
        submitted = client.post("/v1/jobs", json=order)
        job_id, home = submitted.json()["id"], submitted.headers["x-edgegen-node"]
        assert wait_job(client, job_id).json()["status"] == "succeeded"
        assert client.patch(f"/gateway/nodes/{home}", json={"draining": True}).status_code == 200
        found = client.get(f"/v1/jobs/{job_id}")
        assert found.status_code == 200, found.text
        assert found.headers["x-edgegen-node"] != home
        assert found.json()["status"] == "succeeded"


def test_the_fleet_view_shows_each_node(gateway: GatewayProcess, fleet: list[NodeProcess]) -> None:
    for _ in range(30):
        assert httpx.post(f"{gateway.url}/predict", json={"input_data": PIXELS}).status_code == 200
    time.sleep(0.5)  # two status rounds: CPU use is a difference between two of them
    view = httpx.get(f"{gateway.url}/gateway/fleet").json()
    assert (view["known"], view["available"]) == (3, 3)
    assert view["requests_per_s"] > 0
    for node in view["nodes"]:
        assert node["healthy"] is True
        assert node["version"] == __version__
        assert node["models"] == {"digits": "1", "digits-tflite": "1", "tiny-llm": "1"}
        assert 0 <= node["last_seen_s"] < 2
        assert node["status_error"] is None
        assert node["load"]["cpu_cores"] is not None
        assert node["load"]["rss_bytes"] > 0
        traffic = node["traffic"]
        assert traffic["requests_per_s"] > 0  # least connections spread the 30 requests
        assert 0 < traffic["p50_ms"] <= traffic["p99_ms"]
    metrics = httpx.get(f"{gateway.url}/metrics").text
    for node in ("n0", "n1", "n2"):
        assert f'edgegen_gateway_node_available{{node="{node}"}} 1.0' in metrics


def test_kserve_v2_and_errors_pass_through(gateway: GatewayProcess) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": PIXELS}]}
    answer = httpx.post(f"{gateway.url}/v2/models/digits/infer", json=body)
    assert answer.status_code == 200
    assert answer.json()["outputs"][0]["shape"] == [1, 10]
    bad = httpx.post(
        f"{gateway.url}/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400  # the node's own refusal, relayed
    assert "error" in bad.json()
    assert httpx.post(f"{gateway.url}/models/nope/predict", json={"input_data": PIXELS}).status_code == 404


def test_the_openai_client_streams_through_the_gateway(gateway: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Tell me about the edge."}]
    whole = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=24, temperature=0)
    pieces = client.chat.completions.create(
        model="tiny-llm", messages=messages, max_tokens=24, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices)
    assert streamed == whole.choices[0].message.content
    assert len(streamed) > 10


def test_a_chat_sticks_to_the_node_holding_its_prefix(gateway: GatewayProcess) -> None:
    def node_for(system: str) -> str:
        body = {
            "model": "tiny-llm",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
            "max_tokens": 2,
        }
        answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.headers["x-edgegen-node"]

    for system in ("You are terse.", "You are verbose.", "You are a pirate."):
        assert len({node_for(system) for _ in range(4)}) == 1


def test_a_request_id_is_forwarded_and_client_forwarding_headers_are_not(gateway: GatewayProcess) -> None:
    answer = httpx.post(
        f"{gateway.url}/predict",
        json={"input_data": PIXELS},
        headers={"x-request-id": "trace-42", "x-forwarded-for": "6.6.6.6", "forwarded": "for=6.6.6.6"},
    )
    assert answer.headers["x-request-id"] == "trace-42"  # the node's echo of what the gateway forwarded
    answer = httpx.post(
        f"{gateway.url}/predict", json={"input_data": PIXELS}, headers={"x-request-id": "bad id!"}
    )
    assert answer.headers["x-request-id"] != "bad id!"


def test_a_request_the_gateways_gate_refuses_is_counted_and_logged(gateway: GatewayProcess) -> None:
    # The same boundary as a node's, outside the gate: a refusal has its id, its access line, its count.
    def refused() -> float:
        scrape = httpx.get(f"{gateway.url}/metrics").text
        line = next(
            (x for x in scrape.splitlines() if x.startswith('edgegen_gateway_responses_total{status="400"}')),
            "",
        )
        return float(line.split()[-1]) if line else 0.0

    before = refused()
    answer = httpx.get(f"{gateway.url}/v1/.%2e/admin/models", headers={"x-request-id": "refused-7"})
    assert answer.status_code == 400  # dot segments: refused by the gate, before any node
    assert answer.headers["x-request-id"] == "refused-7"
    assert refused() == before + 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in gateway.log().splitlines() if '"refused-7"' in x]
        if any(x.get("logger") == "edgegen.access" and x.get("status") == 400 for x in lines):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no access line for the refused request: {lines}")


def raw(gateway: GatewayProcess, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(request)
        head = sock.recv(4096)
    return int(head.split(b" ", 2)[1]) if head else 0


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_request_smuggling_shapes_are_refused(gateway: GatewayProcess, request_bytes: bytes) -> None:
    assert raw(gateway, request_bytes) == 400
    assert httpx.post(f"{gateway.url}/predict", json={"input_data": PIXELS}).status_code == 200


def test_an_oversized_body_is_refused_before_any_node_sees_it(gateway: GatewayProcess) -> None:
    answer = httpx.post(f"{gateway.url}/predict", content=b"x" * (9 * 1024 * 1024))
    assert answer.status_code == 413
    assert "exceeds" in answer.json()["error"]


def test_the_fleet_changes_at_run_time(gateway: GatewayProcess, fleet: list[NodeProcess]) -> None:
    admin = f"{gateway.url}/gateway/nodes"
    assert [n["name"] for n in httpx.get(admin).json()["nodes"]] == ["n0", "n1", "n2"]
    for name in ("n0", "n1", "n2"):
        assert httpx.patch(f"{admin}/{name}", json={"draining": True}).json()["draining"] is True
    answer = httpx.post(f"{gateway.url}/predict", json={"input_data": PIXELS})
    assert answer.status_code == 503
    assert "no node" in answer.json()["error"]
    assert answer.headers["retry-after"] == "1"  # as a node's own 503 says
    assert httpx.get(f"{gateway.url}/v2/health/ready").status_code == 503
    httpx.patch(f"{admin}/n1", json={"draining": False})
    assert {httpx.post(f"{gateway.url}/predict", json={"input_data": PIXELS}).headers["x-edgegen-node"]
            for _ in range(4)} == {"n1"}  # fmt: skip
    assert httpx.delete(f"{admin}/n2").status_code == 200
    added = httpx.post(admin, json={"url": fleet[2].url, "name": "again", "weight": 2})
    assert added.status_code == 201
    assert httpx.post(admin, json={"url": fleet[2].url}).status_code == 409
    for bad in ({"url": "ftp://x"}, {"url": "http://a:1", "weight": -1}, {"nope": 1}):
        refused = httpx.post(admin, json=bad)
        assert refused.status_code == 400
        assert refused.json()["error"]
    garbled = httpx.post(admin, content=b"{not json", headers={"content-type": "application/json"})
    assert garbled.status_code == 400
    assert httpx.patch(f"{admin}/n0", json={"weight": "heavy"}).status_code == 400
    missing = httpx.patch(f"{admin}/nobody", json={"weight": 2})
    assert missing.status_code == 404
    assert missing.json()["error"]
    httpx.patch(f"{admin}/n0", json={"draining": False})
    served = {httpx.post(f"{gateway.url}/predict", json={"input_data": PIXELS}).headers["x-edgegen-node"]
              for _ in range(8)}  # fmt: skip
    assert served == {"n0", "n1", "again"}
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'edgegen_gateway_nodes{state="available"} 3.0' in metrics
    assert "edgegen_gateway_attempts_total" in metrics
    assert json.loads(httpx.get(f"{gateway.url}/v2/health/ready").text)["nodes_available"] == 3


def test_the_gateway_keeps_its_collector_off_its_start_up_heap(gateway: GatewayProcess) -> None:
    young = metric(gateway, YOUNG_COLLECTIONS)
    predict_together(gateway, PIXELS, clients=64, rounds=16)
    # 64 requests in flight hold thousands of containers at once: at CPython's default threshold (700)
    # the youngest generation is collected ~15 times over these 1,024, settled (observe/heap.py) once.
    assert metric(gateway, YOUNG_COLLECTIONS) - young <= 5
    assert metric(gateway, 'edgegen_gc_seconds_total{generation="2"}') > 0  # (settling, timed)
