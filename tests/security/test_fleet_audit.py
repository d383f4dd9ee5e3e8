"""The fleet scans itself offline: an OSV bundle imported into the gateway, each node's installed
packages read over mutual TLS, the vulnerable ones listed by `edgegen audit` and counted in metrics."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.node_process import GatewayProcess
from tests.security.conftest import Fleet


def edgegen(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgegen", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def advisory(name: str, fixed: str) -> dict[str, object]:
    events = [{"introduced": "0"}, {"fixed": fixed}]
    return {
        "id": name,
        "summary": f"orjson before {fixed}",
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": "orjson"},
                "ranges": [{"type": "ECOSYSTEM", "events": events}],
            }
        ],
    }


def test_import_a_bundle_and_list_the_fleets_vulnerable_packages(
    gateway: GatewayProcess, fleet: Fleet, tmp_path: Path
) -> None:
    orjson_version = importlib.metadata.version("orjson")
    bundle = tmp_path / "osv.json"
    bundle.write_text(json.dumps([advisory("TEST-1", "999"), advisory("TEST-2", "0.0.1")]))
    env = {"EDGEGEN_GATEWAY_HOME": str(fleet.home), "PATH": "/usr/bin:/bin"}
    imported = edgegen("audit", "import", str(bundle), env=env)
    assert imported.returncode == 0, imported.stderr
    assert "imported 2" in imported.stderr

    listed = edgegen("audit", "--gateway", gateway.url, "--key", fleet.keys["operator"], env=env)
    assert listed.returncode == 1, listed.stderr  # vulnerable packages found
    rows = [line for line in listed.stdout.splitlines() if "TEST-" in line]
    assert len(rows) == 2  # the gateway's own environment and node1, TEST-1 only
    assert all("TEST-1" in row and "orjson" in row and orjson_version in row for row in rows)
    assert any("node1" in row for row in rows)

    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'edgegen_gateway_vulnerable_packages{node="node1"} 1.0' in metrics

    refused = edgegen("audit", "--gateway", gateway.url, "--key", fleet.keys["user"], env=env)
    assert refused.returncode == 1
    assert "403" in refused.stderr
