"""`edgegen deploy systemd`: units that systemd accepts without a warning, hardened, running our edgegen."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgegen.deploy import systemd_unit
from edgegen.errors import ConfigError
from edgegen.gateway.settings import load_gateway_settings

EDGEGEN = Path(sys.executable).parent / "edgegen"


def verify(unit: str, path: Path) -> str:
    """What `systemd-analyze verify` says of the unit (empty: nothing to object to)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package)")
    path.write_text(unit)
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr.strip()


def test_a_node_unit(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    unit = systemd_unit(host="0.0.0.0", port=8001, workers=2, config=config)
    assert verify(unit, tmp_path / "edgegen-node.service") == ""
    lines = unit.splitlines()
    assert f"ExecStart={EDGEGEN} serve --host 0.0.0.0 --port 8001 --workers 2 --config {config}" in lines
    assert "Environment=EDGEGEN_HOME=/var/lib/edgegen-node" in lines
    hardening = [
        "DynamicUser=yes", "StateDirectory=edgegen-node", "NoNewPrivileges=yes", "ProtectSystem=strict",
        "ProtectHome=yes", "PrivateDevices=yes", "CapabilityBoundingSet=", "KillSignal=SIGTERM",
        "SystemCallFilter=@system-service", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ]  # fmt: skip
    for directive in hardening:
        assert directive in lines, directive


def test_a_gateway_unit(tmp_path: Path) -> None:
    unit = systemd_unit(gateway=True, name="edge-gw")
    assert verify(unit, tmp_path / "edge-gw.service") == ""
    assert f"ExecStart={EDGEGEN} gateway --host 127.0.0.1 --port 8080" in unit.splitlines()
    assert "Environment=EDGEGEN_GATEWAY_HOME=/var/lib/edge-gw" in unit.splitlines()


@pytest.mark.parametrize(
    "bad",
    [{"gateway": True, "workers": 2}, {"workers": 0}, {"name": "a/b"}, {"name": "x y"}, {"name": "../etc"}],
)
def test_what_cannot_be_a_unit(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        systemd_unit(**bad)  # type: ignore[arg-type]


def test_the_command_writes_the_unit(tmp_path: Path) -> None:
    target = tmp_path / "edgegen-node.service"
    subprocess.run([str(EDGEGEN), "deploy", "systemd", "--output", str(target)], check=True, timeout=60,
                   capture_output=True)  # fmt: skip
    assert target.read_text() == systemd_unit()
    refused = subprocess.run([str(EDGEGEN), "deploy", "systemd", "--gateway", "--workers", "3"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 1
    assert "gateway runs as one process" in refused.stderr


DEPLOY = Path(__file__).parents[2] / "deploy"


def test_the_compose_fleet_is_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    nodes = sorted(name for name in services if name != "gateway")
    assert nodes == ["node1", "node2", "node3"]
    settings = load_gateway_settings(DEPLOY / "compose" / "gateway.toml")
    assert {(n.name, n.url) for n in settings.nodes} == {(n, f"http://{n}:8000") for n in nodes}
    assert [services[n]["environment"]["EDGEGEN_LOGS__NODE"] for n in nodes] == nodes
    assert all(services[n]["environment"]["EDGEGEN_LOGS__SHIP_TO"] == "http://gateway:8080" for n in nodes)
    assert len({services[n]["volumes"][0].split(":")[0] for n in nodes}) == 3  # each node its own home
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published == {"gateway": ["127.0.0.1:8080:8080"]}  # the nodes are reached through it only
    build = compose["x-node"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "docker" / "Dockerfile"


def test_the_dockerfile_copies_what_exists() -> None:
    root = DEPLOY.parent
    for line in (DEPLOY / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            assert all((root / source).exists() for source in sources), line
    assert 'ENTRYPOINT ["edgegen-entrypoint"]' in (DEPLOY / "docker" / "Dockerfile").read_text()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["gateway", "--help"], "edgegen gateway"),
        (["node", "--help"], "edgegen serve"),
        (["echo", "as given"], "as given"),
    ],
)
def test_the_entrypoint(tmp_path: Path, args: list[str], expected: str) -> None:
    env = {"PATH": f"{EDGEGEN.parent}:/usr/bin:/bin", "EDGEGEN_HOME": str(tmp_path), "EDGEGEN_PULL": ""}
    entrypoint = str(DEPLOY / "docker" / "entrypoint.sh")
    done = subprocess.run(["sh", entrypoint, *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout.replace("\n", " ")
