"""Chaos: a node is SIGKILLed under steady load. No client request may fail; the node is ejected fast,
and when it comes back it gets traffic again. A stream whose node dies ends with an error event. All of it
with one gateway process and with two workers sharing one fleet (gateway/shared.py)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import GatewayProcess, NodeProcess
from tests.e2e.test_gateway import PIXELS, running_fleet, running_gateway

pytestmark = pytest.mark.e2e
CLIENTS = 4


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "workers-2"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path], workers: int
) -> Iterator[list[NodeProcess]]:
    # A fleet of its own for each gateway: the tests kill nodes.
    with running_fleet(tmp_path_factory.mktemp(f"chaos-{workers}"), model_files) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, fleet: list[NodeProcess], workers: int
) -> Iterator[GatewayProcess]:
    extra = "[outlier]\nconsecutive_failures = 3\nbase_ejection_s = 2.0\n"
    root = tmp_path_factory.mktemp("chaos-gateway")
    with running_gateway(root, fleet, extra, "--workers", str(workers)) as process:
        yield process


def available(gateway: GatewayProcess, name: str) -> bool:
    node = next(n for n in httpx.get(f"{gateway.url}/gateway/nodes").json()["nodes"] if n["name"] == name)
    return bool(node["healthy"] and not node["draining"] and node["ejected_for_s"] == 0)


def wait_until_available(gateway: GatewayProcess, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not available(gateway, name) and time.monotonic() < deadline:
        time.sleep(0.1)


async def test_a_killed_node_costs_no_request_and_comes_back(
    gateway: GatewayProcess, fleet: list[NodeProcess]
) -> None:
    async with httpx.AsyncClient() as http:
        expected = (await http.post(f"{fleet[0].url}/predict", json={"input_data": PIXELS})).json()
    failures: list[str] = []
    served: Counter[str] = Counter()
    stop = asyncio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            while not stop.is_set():
                try:
                    answer = await http.post("/predict", json={"input_data": PIXELS})
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)
                    continue
                if answer.status_code != 200 or answer.json() != expected:
                    failures.append(f"{answer.status_code} {answer.text[:100]}")
                else:
                    served[answer.headers["x-edgegen-node"]] += 1

    load = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    await asyncio.sleep(1.0)
    victim, port = fleet[1], fleet[1].port
    killed = time.monotonic()
    await asyncio.to_thread(victim.kill)
    ejected_after = None
    while time.monotonic() - killed < 5:
        if not await asyncio.to_thread(available, gateway, "n1"):
            ejected_after = time.monotonic() - killed
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.0)
    before = served["n1"]
    stop.set()
    await asyncio.gather(*load)

    # The figures of the run (shown with -s): answers, failures, time to ejection.
    print(f"chaos: {sum(served.values())} answers, {len(failures)} failed, ejected after {ejected_after} s")
    assert failures == []
    assert sum(served.values()) > 100
    assert ejected_after is not None
    assert ejected_after < 2.0, ejected_after

    # The node restarts on its port; the health checks bring it back and it serves again.
    fleet[1] = await asyncio.to_thread(NodeProcess(victim.home, env=LLM_ENV, port=port).start)
    await asyncio.to_thread(wait_until_available, gateway, "n1", 15.0)
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        answers = [await http.post("/predict", json={"input_data": PIXELS}) for _ in range(12)]
    assert all(a.status_code == 200 for a in answers)
    assert served["n1"] == before  # nothing reached it while it was dead
    assert "n1" in {a.headers["x-edgegen-node"] for a in answers}


def test_a_stream_whose_node_dies_ends_with_an_error_event(
    gateway: GatewayProcess, fleet: list[NodeProcess]
) -> None:
    body = {
        "model": "tiny-llm",
        "messages": [{"role": "user", "content": "Write for a long time."}],
        "max_tokens": 1500,
        "stream": True,
    }
    lines: list[str] = []
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=20) as response:
        assert response.status_code == 200
        node = fleet[int(response.headers["x-edgegen-node"][1:])]
        for line in response.iter_lines():
            lines.append(line)
            if len(lines) == 10:
                node.kill()
    data = [line for line in lines if line.startswith("data: ")]
    assert '"error"' in data[-1]
    assert "[DONE]" not in "".join(data)
