"""`edgegen gateway --workers 2`: two processes on one port, one fleet (gateway/shared.py). Clients hold
kept-alive connections spread over both workers, so what every client sees, both workers see."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from edgegen.observe.logs import timestamp
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import GatewayProcess, NodeProcess, assert_no_errors, worker_processes
from tests.e2e.test_gateway import PIXELS, running_fleet, running_gateway

pytestmark = pytest.mark.e2e
CLIENTS = 16
MAX_CLIENTS = 256
SETTLE_S = 1.0  # the workers read the shared fleet every 0.1 s here (half the 0.2 s health interval)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[list[NodeProcess]]:
    with running_fleet(tmp_path_factory.mktemp("workers"), model_files, n=2) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fleet: list[NodeProcess]) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("workers-gateway")
    alerts = "[alerts]\nwindow_s = 3\nbaseline_s = 30\nevaluate_s = 0.2\nmin_requests = 10\n"
    with running_gateway(root, fleet, alerts, "--workers", "2") as process:
        yield process
    # A worker killed on purpose below leaves no error line; nodes killed on purpose only warnings.
    assert_no_errors(process)


@pytest.fixture
def clients(gateway: GatewayProcess) -> Iterator[list[httpx.Client]]:
    """Kept-alive clients, their connections on both workers: the kernel hands a connection to whichever
    worker accepts first, which can be the same one many times running, so clients are added until both
    hold some (or the test says the kernel never spread them)."""
    held: list[httpx.Client] = []
    try:
        while len(held) < MAX_CLIENTS:
            for _ in range(CLIENTS):
                client = httpx.Client(base_url=gateway.url, timeout=10)
                held.append(client)
                assert client.get("/v2/health/live").status_code == 200
            if len(holding(gateway)) == 2:
                break
        assert len(holding(gateway)) == 2, "no connection reached the second worker"
        yield held
    finally:
        for client in held:
            client.close()


def holding(gateway: GatewayProcess) -> set[int]:
    """The workers that hold a client's connection now (not one killed that its supervisor has yet to
    reap: a zombie has no connections to list)."""
    held = set()
    for worker in worker_processes(gateway):
        with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
            connections = worker.net_connections(kind="tcp")
            if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == gateway.port for c in connections):
                held.add(worker.pid)
    return held


def every_client_sees(
    clients: list[httpx.Client], check: Callable[[dict[str, dict]], bool], within_s: float = SETTLE_S
) -> None:
    """`check` of the fleet (name -> node) holds for every client within `within_s`."""
    deadline = time.monotonic() + within_s
    for client in clients:
        while True:
            nodes = {n["name"]: n for n in client.get("/gateway/nodes").json()["nodes"]}
            if check(nodes):
                break
            assert time.monotonic() < deadline, nodes
            time.sleep(0.05)


def test_admin_changes_on_one_worker_reach_every_worker(
    gateway: GatewayProcess, clients: list[httpx.Client]
) -> None:
    assert clients[0].patch("/gateway/nodes/n0", json={"draining": True}).status_code == 200
    every_client_sees(clients, lambda nodes: nodes["n0"]["draining"])
    for client in clients:  # and no worker sends anything to it
        answer = client.post("/predict", json={"input_data": PIXELS})
        assert (answer.status_code, answer.headers["x-edgegen-node"]) == (200, "n1")

    assert clients[1].patch("/gateway/nodes/n1", json={"weight": 7}).status_code == 200
    added = clients[2].post("/gateway/nodes", json={"url": "http://127.0.0.1:9", "name": "extra"})
    assert added.status_code == 201
    every_client_sees(clients, lambda nodes: "extra" in nodes and nodes["n1"]["weight"] == 7)
    for client in clients[3:6]:  # taken on every worker: the name and the URL are the fleet's, not one's
        assert client.post("/gateway/nodes", json={"url": "http://127.0.0.1:9"}).status_code == 409
        taken = client.post("/gateway/nodes", json={"url": "http://127.0.0.1:8", "name": "extra"})
        assert taken.status_code == 409

    assert clients[6].delete("/gateway/nodes/extra").status_code == 200
    assert clients[7].patch("/gateway/nodes/n0", json={"draining": False}).status_code == 200
    assert clients[8].patch("/gateway/nodes/n1", json={"weight": 1}).status_code == 200
    every_client_sees(clients, lambda nodes: set(nodes) == {"n0", "n1"} and not nodes["n0"]["draining"])
    served = {c.post("/predict", json={"input_data": PIXELS}).headers["x-edgegen-node"] for c in clients}
    assert served == {"n0", "n1"}


def relayed_per_s(client: httpx.Client) -> float:
    return float(client.get("/gateway/fleet").json()["requests_per_s"])


def test_every_worker_shows_the_traffic_of_all_and_the_same_history(clients: list[httpx.Client]) -> None:
    """Each worker relays its clients' share; the fleet view and its history are the fleet's whichever
    worker answers (shared.py)."""
    since = time.time()
    time.sleep(SETTLE_S)  # what came before is told by every worker
    before = [relayed_per_s(client) for client in clients]
    for client in clients:
        for _ in range(4):
            assert client.post("/predict", json={"input_data": PIXELS}).status_code == 200
    time.sleep(SETTLE_S)
    after = [relayed_per_s(client) for client in clients]  # from both workers
    sent_per_s = 4 * len(clients) / 60  # (the view's rates are over its last minute)
    assert all(b - a >= sent_per_s - 0.05 for a, b in zip(before, after, strict=True)), (before, after)

    histories = [
        client.get("/gateway/fleet/history", params={"since": since}).json()["nodes"] for client in clients
    ]
    longest = max(histories, key=lambda h: len(h["n0"]))
    for (
        history
    ) in histories:  # the leader's points, a new one every 0.2 s: each answer a prefix of a later one
        assert set(history) == {"n0", "n1"}
        assert history["n0"], history
        assert all(history[n] == longest[n][: len(history[n])] for n in history)


def test_a_spike_shipped_to_both_workers_is_one_alert_every_worker_shows(
    gateway: GatewayProcess, clients: list[httpx.Client]
) -> None:
    """Nodes ship their lines to whichever worker their connection reached; the leader analyses all of
    them (shared.py): one alert, raised once, the same from every worker."""
    line = {"ts": timestamp(time.time()), "level": "info", "logger": "edgegen.access", "msg": "request"}
    for n, client in enumerate(clients):
        entries = [[seq, {**line, "status": 503, "ms": 3.0, "model": "digits"}] for seq in (1, 2)]
        answer = client.post("/gateway/logs", json={"node": "spiky", "spool": f"c{n}", "entries": entries})
        assert answer.status_code == 200, answer.text

    def shown(client: httpx.Client) -> list[tuple[str, str, float]]:
        active = client.get("/gateway/alerts").json()["active"]
        return [(a["kind"], a["node"], a["since"]) for a in active if a["node"] == "spiky"]

    deadline = time.monotonic() + 10
    while not shown(clients[0]):
        assert time.monotonic() < deadline, gateway.log()[-2000:]
        time.sleep(0.1)
    [alert] = shown(clients[0])
    for client in clients:  # on both workers
        assert shown(client) == [alert]
        assert sample(client, 'edgegen_gateway_alerts_total{kind="error_spike"}') == 1  # raised once
        assert (
            sample(client, 'edgegen_gateway_alert_active{kind="error_spike",model="digits",node="spiky"}')
            == 1
        )


def sample(client: httpx.Client, prefix: str) -> float:
    """The first sample on the worker's /metrics whose line starts with `prefix` (0 if none)."""
    lines = client.get("/metrics").text.splitlines()
    return next((float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(prefix)), 0.0)


def leaders(gateway: GatewayProcess) -> list[int]:
    lines = [json.loads(line) for line in gateway.log().splitlines() if "leads the fleet" in line]
    return [line["pid"] for line in lines]


def test_one_worker_checks_health_and_another_takes_over_when_it_dies(
    gateway: GatewayProcess, fleet: list[NodeProcess], clients: list[httpx.Client]
) -> None:
    first = leaders(gateway)
    assert len(first) == 1  # one worker checks the nodes; the other takes its verdicts
    history = clients[0].get("/gateway/fleet/history").json()["nodes"]["n0"]
    alerts = clients[0].get("/gateway/alerts").json()["recent"]
    raised = sample(clients[0], 'edgegen_gateway_alerts_total{kind="error_spike"}')
    assert history  # (the tests before made traffic and raised an alert)
    assert alerts
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while len(leaders(gateway)) < 2:
        assert time.monotonic() < deadline, gateway.log()[-2000:]
        time.sleep(0.05)
    assert leaders(gateway)[1] != first[0]

    # The new leader goes on with the last one's history and alerts: nothing lost, nothing raised again.
    alive = [c for c in clients if _answers(c)]  # the clients whose worker was not killed
    time.sleep(SETTLE_S)  # a round of status reads and of analysis by the new leader
    for client in alive:
        after = client.get("/gateway/fleet/history").json()["nodes"]["n0"]
        assert after[: len(history)] == history
        assert len(after) > len(history)
        recent = client.get("/gateway/alerts").json()["recent"]
        assert {(a["kind"], a["since"]) for a in alerts} <= {(a["kind"], a["since"]) for a in recent}
        assert sample(client, 'edgegen_gateway_alerts_total{kind="error_spike"}') == raised

    # The new leader's verdicts reach every worker: a dead node is out, and back once it is up.
    victim, port = fleet[1], fleet[1].port
    victim.kill()
    every_client_sees(alive, lambda nodes: not nodes["n1"]["healthy"], within_s=5.0)
    fleet[1] = NodeProcess(victim.home, env=LLM_ENV, port=port).start()
    deadline = time.monotonic() + 10
    while not all(_healthy(c, "n1") for c in alive):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/v2/health/live").status_code == 200
    except httpx.TransportError:
        return False


def _healthy(client: httpx.Client, name: str) -> bool:
    return bool(next(n for n in client.get("/gateway/nodes").json()["nodes"] if n["name"] == name)["healthy"])


def test_every_worker_scrapes_the_counts_of_all(clients: list[httpx.Client]) -> None:
    def relayed(client: httpx.Client) -> tuple[float, float]:
        lines = client.get("/metrics").text.splitlines()
        tries = sum(
            float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("edgegen_gateway_attempts_total{")
        )
        known = next(
            float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith('edgegen_gateway_nodes{state="known"}')
        )
        return tries, known

    before = relayed(clients[0])[0]
    for client in clients:
        assert client.post("/predict", json={"input_data": PIXELS}).status_code == 200
    scraped = [relayed(client) for client in clients]  # from both workers
    assert {known for _, known in scraped} == {2.0}
    assert all(tries - before >= len(clients) for tries, _ in scraped)  # each worker's share counted by all
