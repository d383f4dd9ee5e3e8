"""deploy/compose.yaml as shipped, under podman-compose: a gateway and three nodes come up, one node is
SIGKILLed under steady load through the gateway, and no request fails.

Each node's volume is made beforehand and filled with a model store, as an operator would (a node pulls
its models into an empty volume only on its first start); the gateway's starts empty."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgegen.modelkit.layers import DenseLayer, mlp_forward
from tests.container.conftest import need
from tests.container.podman import ENV, ROOT, copy_home, podman

pytestmark = pytest.mark.container
PROJECT = f"edgegentest{os.getpid()}"
NODES = ("node1", "node2", "node3")
GATEWAY = "http://127.0.0.1:8080"  # where the compose file publishes it
PIXELS = np.random.default_rng(0).integers(0, 17, (64,)).astype(float).tolist()
CLIENTS = 4
READY = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"


def compose(*args: str, timeout: float = 300) -> None:
    command = ["podman-compose", f"--project-name={PROJECT}", "--file=deploy/compose.yaml", *args]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def remove_project() -> None:
    """All the project left: podman-compose 1.0's `down` keeps its network and what was restarting."""
    label = f"--filter=label=io.podman.compose.project={PROJECT}"
    for name in podman("ps", "--all", label, "--format={{.Names}}").stdout.split():
        podman("rm", "--force", "--time=0", name, check=False)
    for volume in [*NODES, "gateway"]:
        podman("volume", "rm", "--force", f"{PROJECT}_{volume}", check=False)
    podman("network", "rm", "--force", f"{PROJECT}_default", check=False)


@pytest.fixture(scope="module")
def fleet(models_home: Path) -> Iterator[str]:
    """The fleet up, every node ready and routed to by the gateway; an admin key of the gateway."""
    if shutil.which("podman-compose") is None:
        need("podman-compose is not installed (apt-get install podman-compose)")
    if port_taken(8080):
        need("127.0.0.1:8080 is taken: the compose file publishes the gateway there")
    try:
        for node in NODES:
            podman("volume", "create", f"{PROJECT}_{node}")
            mountpoint = podman("volume", "inspect", "--format={{.Mountpoint}}", f"{PROJECT}_{node}").stdout
            copy_home(models_home, Path(mountpoint.strip()))
        compose("up", "--detach", "--no-build")
        deadline = time.monotonic() + 120
        for node in NODES:  # the nodes are published nowhere: asked from inside
            name = f"{PROJECT}_{node}_1"
            while podman("exec", name, "python", "-c", READY, check=False).returncode:
                restarts = podman("inspect", "--format={{.RestartCount}}", name).stdout.strip()
                if restarts != "0" or time.monotonic() > deadline:
                    logs = podman("logs", "--tail=40", name, check=False)
                    pytest.fail(f"{node} is not ready ({restarts} restarts):\n{logs.stdout}{logs.stderr}")
                time.sleep(0.5)
        gateway = f"{PROJECT}_gateway_1"
        admin = podman("exec", gateway, "edgegen", "keys", "create", "--role=admin").stdout.strip()
        # The gateway counts a node in until its checks say otherwise, and may have seen one still loading.
        while sorted(available(admin)) != list(NODES):
            assert time.monotonic() < deadline, f"the gateway routes to {available(admin)} only"
            time.sleep(0.5)
        yield admin
        compose("down", timeout=180)
    finally:
        remove_project()


def available(key: str) -> list[str]:
    """The nodes the gateway routes to now."""
    headers = {"Authorization": f"Bearer {key}"}
    try:
        nodes = httpx.get(f"{GATEWAY}/gateway/nodes", headers=headers, timeout=5).json()["nodes"]
    except (httpx.TransportError, ValueError, KeyError):
        return []
    return [n["name"] for n in nodes if n["healthy"] and not n["draining"] and n["ejected_for_s"] == 0]


async def test_a_killed_node_costs_no_request(fleet: str, tiny_layers: list[DenseLayer]) -> None:
    expected = mlp_forward(tiny_layers, np.array([PIXELS], dtype=np.float32))
    failures: list[str] = []
    served: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def client() -> None:
        headers = {"Authorization": f"Bearer {fleet}"}
        async with httpx.AsyncClient(base_url=GATEWAY, headers=headers, timeout=10) as http:
            while not stop.is_set():
                try:
                    answer = await http.post("/predict", json={"input_data": PIXELS})
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)
                    continue
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text[:100]}")
                elif not np.allclose(answer.json()["prediction"], expected, rtol=1e-4, atol=1e-4):
                    failures.append(f"a wrong answer from {answer.headers['x-edgegen-node']}")
                else:
                    served.append((time.monotonic(), answer.headers["x-edgegen-node"]))

    load = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    await asyncio.sleep(2.0)
    await asyncio.to_thread(podman, "kill", "--signal=KILL", f"{PROJECT}_node2_1")
    killed = time.monotonic()
    await asyncio.sleep(3.0)
    stop.set()
    await asyncio.gather(*load)

    before = Counter(node for at, node in served if at < killed)
    after = Counter(node for at, node in served if at > killed)
    print(f"compose fleet: {len(served)} answers, {len(failures)} failed; before {before}, after {after}")
    assert failures == []
    assert set(before) == set(NODES)  # all three served
    assert {"node1", "node3"} <= set(after)  # and the traffic went on without node2


def test_clients_through_the_published_port_are_not_banned_for_one(fleet: str) -> None:
    """They all arrive from the network's gateway address: a ban of one would lock out every user of
    the host (`never_ban` holds Docker's and podman's networks)."""
    for attempt in range(15):  # more than the gateway's failures before a ban
        wrong = {"Authorization": f"Bearer eg_{attempt:08x}_wrong"}
        assert httpx.post(f"{GATEWAY}/predict", json={"input_data": PIXELS}, headers=wrong).status_code == 401
    right = {"Authorization": f"Bearer {fleet}"}
    assert httpx.post(f"{GATEWAY}/predict", json={"input_data": PIXELS}, headers=right).status_code == 200
