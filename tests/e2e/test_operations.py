"""Remote operations through the gateway on real nodes: a restart under load drops nothing — the node
is drained first (its streams finish), restarted in place, and put back once a new process is ready."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import fill_store
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import GatewayProcess, NodeProcess, running
from tests.llm_models import write_tiny_llama


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("ops")
    nodes = []
    for i in range(2):
        store = fill_store(root / f"node{i}" / "models", model_files)
        store.add(write_tiny_llama(root / f"node{i}" / "tiny.gguf"), "tiny-llm", task="text-generation")
        nodes.append(NodeProcess(root / f"node{i}", env=LLM_ENV))
    config = root / "gateway.toml"
    config.write_text(
        "".join(f'[[nodes]]\nurl = "{n.url}"\nname = "n{i}"\n' for i, n in enumerate(nodes))
        + '[balancer]\nroutes = { "/v1/chat/completions" = "round_robin" }\n'
        + "[health]\ninterval_s = 0.2\ntimeout_s = 0.5\nstatus_interval_s = 0.5\n"
    )
    with (
        running(nodes[0]),
        running(nodes[1]),
        running(GatewayProcess(root, "--config", str(config))) as gateway,
    ):
        yield gateway


def stream(gateway: GatewayProcess, out: list[tuple[str, list[str]]]) -> None:
    body = {"model": "tiny-llm", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200,
            "temperature": 0.8, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=120) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        out.append((response.headers["x-edgegen-node"], events))


def test_a_restart_under_load_drops_nothing(fleet: GatewayProcess) -> None:
    statuses: Counter[int] = Counter()
    served: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=fleet.url, timeout=30) as client:
            while not stop.is_set():
                answer = client.post("/predict", json={"input_data": [3.0] * 64})
                statuses[answer.status_code] += 1
                served[answer.headers.get("x-edgegen-node", "-")] += 1

    streams: list[tuple[str, list[str]]] = []
    workers = [threading.Thread(target=load) for _ in range(2)]
    workers += [threading.Thread(target=stream, args=(fleet, streams)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        restarted = httpx.post(f"{fleet.url}/gateway/nodes/n0/restart", timeout=180)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    assert restarted.status_code == 200, restarted.text
    result = restarted.json()
    assert result["started"] > result["started_before"]  # a new process (exec: the same pid, a new start)
    assert result["drained_s"] > 0  # it waited for what n0 had, its stream among them
    assert set(statuses) == {200}, statuses  # nothing dropped, nothing failed
    assert sum(statuses.values()) > 100
    assert sorted(node for node, _ in streams) == ["n0", "n1"]
    for _, events in streams:  # both streams, n0's across its drain, ended whole
        assert events[-1] == "[DONE]"
        assert orjson.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        assert not any("error" in orjson.loads(e) for e in events[:-1])
    after = Counter(
        httpx.post(f"{fleet.url}/predict", json={"input_data": [3.0] * 64}).headers["x-edgegen-node"]
        for _ in range(10)
    )
    assert after["n0"] > 0  # back in the fleet


def test_the_command_restarts_a_node(fleet: GatewayProcess) -> None:
    command = [sys.executable, "-m", "edgegen", "admin", "restart", "n1", "--gateway", fleet.url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr
    assert "n1: drained in" in done.stderr
    missing = subprocess.run(
        [*command[:5], "no-such-node", *command[6:]], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1
    assert "answered 404" in missing.stderr
