"""What a node tells about itself: the machine's and its processes' figures in /metrics, and
GET /admin/status (what the gateway's fleet view shows), for operators only; and the Grafana dashboard
in deploy/ asks only for metrics a node and a gateway export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgegen import __version__
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import (
    YOUNG_COLLECTIONS,
    GatewayProcess,
    NodeProcess,
    metric,
    predict_together,
    running,
    tenant_headers,
)


@pytest.fixture(scope="module")
def node(node_home: Path) -> Iterator[NodeProcess]:
    with running(NodeProcess(node_home, env=LLM_ENV, auth=True)) as process:
        yield process


def test_system_and_process_figures_are_in_the_metrics(node: NodeProcess) -> None:
    cpu = metric(node, 'edgegen_node_cpu_seconds_total{mode="user"}')
    for _ in range(200):
        httpx.post(f"{node.url}/predict", json={"input_data": [1.0] * 64}, headers=node.headers)
    assert metric(node, 'edgegen_node_cpu_seconds_total{mode="user"}') > cpu > 0
    assert metric(node, "edgegen_node_resident_memory_bytes") > 20 * 2**20
    assert metric(node, "edgegen_node_processes") == 1
    assert metric(node, "edgegen_system_cpus") >= 1
    total = metric(node, 'edgegen_system_memory_bytes{state="total"}')
    assert total > metric(node, 'edgegen_system_memory_bytes{state="available"}') > 0
    assert metric(node, 'edgegen_system_disk_bytes{state="total"}') > 0
    text = httpx.get(f"{node.url}/metrics").text
    for family in ("edgegen_system_network_bytes_total", "edgegen_system_disk_io_bytes_total",
                   "edgegen_system_load_average", "edgegen_system_cpu_usage_ratio"):  # fmt: skip
        assert f"\n{family}" in text, family


def test_the_node_keeps_its_collector_off_its_start_up_heap(node: NodeProcess) -> None:
    young = metric(node, YOUNG_COLLECTIONS)
    predict_together(node, [1.0] * 64, clients=64, rounds=16)
    # With models loaded the heap is settled (observe/heap.py): many requests in flight at once no longer
    # set off a collection of the youngest generation every few requests (~15 over these at the default).
    assert metric(node, YOUNG_COLLECTIONS) - young <= 5
    assert metric(node, 'edgegen_gc_seconds_total{generation="2"}') > 0  # (settling, timed)


def test_status_tells_the_version_models_and_load(node: NodeProcess, node_home: Path) -> None:
    assert httpx.get(f"{node.url}/admin/status").status_code == 401
    assert httpx.get(f"{node.url}/admin/status", headers=tenant_headers(node_home, "acme")).status_code == 403
    status = httpx.get(f"{node.url}/admin/status", headers=node.headers).json()
    assert status["version"] == __version__
    assert status["ready"] is True
    assert status["models"] == {"digits": "1", "digits-tflite": "1", "tiny-llm": "1"}
    assert status["in_flight"] == 1  # this request
    assert status["cpu_seconds"] > 0
    assert status["rss_bytes"] > 20 * 2**20
    assert set(status["jobs"]) == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert set(status["cache"]) == {"memory_bytes", "memory_entries", "disk_bytes", "disk_entries"}


DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "edgegen-fleet.json"


def exported(text: str) -> set[str]:
    """Metric names a /metrics page declares (TYPE lines, labelled families included before their first
    sample) and the series names a histogram adds."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


def test_the_grafana_dashboard_asks_only_for_exported_metrics(node: NodeProcess, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[nodes]]\nurl = "{node.url}"\nname = "n0"\n[health]\ninterval_s = 0.2\n')
    with running(GatewayProcess(tmp_path, "--config", str(config))) as gateway:
        assert httpx.post(
            f"{gateway.url}/predict", json={"input_data": [1.0] * 64}, headers=node.headers
        ).is_success
        names = exported(httpx.get(f"{gateway.url}/metrics").text) | exported(
            httpx.get(f"{node.url}/metrics").text
        )
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 30
    asked = {name for expr in exprs for name in re.findall(r"\bedgegen_[a-z0-9_]+", expr)}
    assert asked - names == set()
    for area in ("gateway_upstream", "request_duration", "time_to_first_token", "cache_hits", "jobs",
                 "system_cpu", "system_network", "node_resident_memory", "security_refusals"):  # fmt: skip
        assert any(area in name for name in asked), area
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert len({(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels}) == len(
        panels
    )  # no two overlap at a corner
