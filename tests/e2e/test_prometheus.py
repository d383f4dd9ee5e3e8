"""A real Prometheus (Debian's package, installed by `make setup`) scrapes a gateway and three nodes with
deploy/prometheus/ as shipped, but for the targets' ports: after traffic of every kind the dashboard
shows, each of the Grafana dashboard's queries returns data through Prometheus' HTTP API, every alert
rule evaluates without error on metrics the fleet exports, and a node killed fires EdgegenNodeDown
within two evaluation intervals of its first failed scrape."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import GatewayProcess, NodeProcess, free_port
from tests.e2e.test_gateway import running_fleet, running_gateway, wait_job

pytestmark = pytest.mark.e2e
DEPLOY = Path(__file__).parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "edgegen-fleet.json"
# A memory tier of one or two answers, so that distinct requests evict (the dashboard's evictions panel).
NODE_ENV = {**LLM_ENV, "EDGEGEN_CACHE__MEMORY_BYTES": "1500"}
RNG = np.random.default_rng(1)


def shipped_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    return config


def seconds(duration: str) -> float:
    """A Prometheus duration of one unit, as prometheus.yml writes them ("5s", "1m")."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert match is not None, duration
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match[2]]


class Prometheus:
    """`prometheus` on a free loopback port, reading the shipped config with only the targets changed."""

    def __init__(self, root: Path, gateway: GatewayProcess, nodes: list[NodeProcess]) -> None:
        config = shipped_config()
        targets = {
            "edgegen-gateway": [f"127.0.0.1:{gateway.port}"],
            "edgegen-node": [f"127.0.0.1:{n.port}" for n in nodes],
        }
        for job in config["scrape_configs"]:
            (static,) = job["static_configs"]
            static["targets"] = targets[job["job_name"]]
        for name in config["rule_files"]:  # relative to the config file, as shipped
            shutil.copy(DEPLOY / "prometheus" / name, root / name)
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: `make setup` installs Debian's prometheus package")
        command = [binary, f"--config.file={self.root / 'prometheus.yml'}",
                   f"--storage.tsdb.path={self.root / 'data'}",
                   f"--web.listen-address=127.0.0.1:{self.port}"]  # fmt: skip
        with (self.root / "prometheus.log").open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            assert self.process.poll() is None, self.log()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)

    def log(self) -> str:
        return (self.root / "prometheus.log").read_text(errors="replace")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query now (`/api/v1/query`); a query error fails the test."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def scraped_after(self, moment: float, targets: int, timeout: float = 30) -> None:
        """Wait until each of the `targets` has been scraped since `moment` (seconds since the epoch)."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            stamps = [float(r["value"][1]) for r in self.query("timestamp(up)")]
            if len(stamps) == targets and min(stamps) > moment:
                return
            time.sleep(0.2)
        raise AssertionError(f"not every target was scraped within {timeout} s: {self.query('up')}")


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[list[NodeProcess]]:
    with running_fleet(tmp_path_factory.mktemp("prometheus-fleet"), model_files, env=NODE_ENV) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fleet: list[NodeProcess]) -> Iterator[GatewayProcess]:
    with running_gateway(tmp_path_factory.mktemp("prometheus-gateway"), fleet) as process:
        yield process


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, gateway: GatewayProcess, fleet: list[NodeProcess]
) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), gateway, fleet)
    server.start()
    try:
        server.scraped_after(0, targets=4)
        yield server
    finally:
        server.stop()


def traffic(gateway: GatewayProcess, fleet: list[NodeProcess], turn: int) -> None:
    """One round of every kind of request the dashboard has a panel for; each round's are new, so that
    the response cache answers none of them from an earlier round."""
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        inputs = RNG.integers(0, 17, (12, 64)).astype(float).tolist()
        for pixels in inputs + [inputs[0]] * 6:  # misses that evict from a small memory tier, then hits
            assert http.post("/predict", json={"input_data": pixels}).status_code == 200
        assert http.post("/predict", json={"input_data": "not pixels"}).status_code == 400
        for question in range(3):  # one system prompt: the prefix cache holds it after the first
            messages = [{"role": "system", "content": "You answer questions about edge computing."},
                        {"role": "user", "content": f"Question {question} of round {turn}?"}]  # fmt: skip
            chat = {"model": "tiny-llm", "messages": messages, "max_tokens": 8, "temperature": 0}
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
        order = {"method": "POST", "url": "/predict", "body": {"input_data": inputs[1]}}
        job = http.post("/v1/jobs", json=order).json()["id"]
        assert wait_job(http, job).json()["status"] == "succeeded"
    for node in fleet:  # a scanner's probe: the security gate refuses it
        assert httpx.get(f"{node.url}/.env").status_code == 404


@pytest.fixture(scope="module")
def after_traffic(prometheus: Prometheus, gateway: GatewayProcess, fleet: list[NodeProcess]) -> Prometheus:
    """Two rounds of traffic, each seen by a scrape of every target: rates need two samples apart."""
    for turn in range(2):
        traffic(gateway, fleet, turn)
        prometheus.scraped_after(time.time(), targets=4)
    return prometheus


def test_every_dashboard_query_returns_data(after_traffic: Prometheus, fleet: list[NodeProcess]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # The `node` variable, as Grafana reads it: label_values(edgegen_node_processes, instance).
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "node")
    metric = re.fullmatch(r"label_values\((\w+), instance\)", variable["definition"])
    assert metric is not None, variable["definition"]
    instances = {r["metric"]["instance"] for r in after_traffic.query(metric[1])}
    assert instances == {f"127.0.0.1:{n.port}" for n in fleet}
    # "All" is the variable's allValue, as Grafana substitutes it.
    queries = [(p["title"], t["expr"].replace("$node", variable["allValue"]))
               for p in dashboard["panels"] for t in p.get("targets", [])]  # fmt: skip
    empty = {}
    for title, expr in queries:
        values = [float(r["value"][1]) for r in after_traffic.query(expr)]
        if not any(math.isfinite(v) for v in values):  # a NaN line (a quantile of nothing) draws nothing
            empty[f"{title}: {expr}"] = values
    print(f"prometheus: {len(queries)} dashboard queries, {len(empty)} without data")
    assert empty == {}


def test_every_rule_evaluates_on_exported_metrics(after_traffic: Prometheus) -> None:
    groups = httpx.get(f"{after_traffic.url}/api/v1/rules").json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["name"] for r in rules} >= {
        "EdgegenNodeDown", "EdgegenNodeErrorRate", "EdgegenSlowInference", "EdgegenKvCacheFull",
        "EdgegenQueueFull", "EdgegenDiskNearlyFull",
    }  # fmt: skip
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # A misspelt metric is no error to Prometheus: the rule would just never fire.
    names = after_traffic.query('count by (__name__) ({__name__=~".+"})')
    exported = {r["metric"]["__name__"] for r in names}
    asked = {name for r in rules for name in re.findall(r"\bedgegen_[a-z0-9_]+", r["query"])}
    assert asked - exported == set()


def test_a_killed_node_fires_node_down_within_two_evaluations(
    after_traffic: Prometheus, fleet: list[NodeProcess]
) -> None:
    interval = seconds(shipped_config()["global"]["evaluation_interval"])
    victim = fleet[1]
    instance = f"127.0.0.1:{victim.port}"
    victim.kill()
    firing: list[dict[str, Any]] = []
    until = time.monotonic() + 4 * interval + 10
    while not firing and time.monotonic() < until:
        alerts = httpx.get(f"{after_traffic.url}/api/v1/alerts").json()["data"]["alerts"]
        firing = [a for a in alerts if a["state"] == "firing"]
        time.sleep(0.2)
    assert [(a["labels"]["alertname"], a["labels"]["instance"]) for a in firing] == [
        ("EdgegenNodeDown", instance)
    ]
    assert instance in firing[0]["annotations"]["summary"]
    # Prometheus' own record: the first failed scrape (up 0), the first evaluation that found it firing.
    up = after_traffic.query(f'up{{instance="{instance}"}}[5m]')[0]["values"]
    failed = next(float(t) for t, v in up if v == "0")
    alert = f'ALERTS{{alertname="EdgegenNodeDown",alertstate="firing",instance="{instance}"}}[5m]'
    fired = float(after_traffic.query(alert)[0]["values"][0][0])
    print(f"prometheus: EdgegenNodeDown fired {fired - failed:.1f} s after the first failed scrape")
    assert 0 < fired - failed <= 2 * interval
