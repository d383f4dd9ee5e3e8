"""Upgrades pushed through a real gateway to real nodes, node by node, health-gated.

edgegen itself: a signed wheel (this checkout's code under another version) goes into a new environment on
each node. A version that fails to start, or starts and fails its probe inference, is left and the node goes
back; a version never confirmed leaves by itself; unsigned, forged and hostile uploads change nothing.
A model: a signed package archive sent in the body goes to every node and is served; an unsigned one
stops at the first node, and nothing changes."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgegen.executors import describe_model
from edgegen.security.signing import Signer
from edgegen.store import ModelStore
from tests.conftest import fill_store
from tests.e2e.node_process import GatewayProcess, NodeProcess, gateway_config, running
from tests.software_wheel import SOURCE, build_wheel

# What the failing versions below log, on purpose.
EXPECTED = ("software trial failed", "broken on purpose", "inference failed", "Exception in ASGI application")


def _key_pair(folder: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = folder / "release.key", folder / "release.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


class Fleet:
    def __init__(self, root: Path, gateway: GatewayProcess, nodes: list[NodeProcess], key: Path) -> None:
        self.root, self.gateway, self.nodes, self.key = root, gateway, nodes, key

    def signed(self, version: str, patch: dict[str, str] | None = None) -> Path:
        wheel = build_wheel(self.root / "wheels" / version, version, patch=patch)
        done = subprocess.run(
            [sys.executable, "-m", "edgegen", "software", "sign", str(wheel), "--key", str(self.key)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return wheel

    def upgrade(self, wheel: Path, *nodes: str) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable,
            "-m",
            "edgegen",
            "admin",
            "upgrade",
            str(wheel),
            "--gateway",
            self.gateway.url,
        ]
        command += [arg for node in nodes for arg in ("--node", node)]
        return subprocess.run(command, capture_output=True, text=True, timeout=400)

    def software(self, node: NodeProcess) -> dict[str, object]:
        return httpx.get(f"{node.url}/admin/software").json()  # type: ignore[no-any-return]

    def version(self, node: NodeProcess) -> str:
        return str(httpx.get(f"{node.url}/admin/status").json()["version"])

    def served(self) -> list[str]:
        """The version of `digits` each node serves."""
        return [httpx.get(f"{n.url}/admin/status").json()["models"]["digits"] for n in self.nodes]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("software")
    private, public = _key_pair(root)
    env = {
        "EDGEGEN_SECURITY__TRUSTED_SIGNERS": f'["{public}"]',
        "EDGEGEN_SECURITY__SIGNED_MODELS": "required",
    }
    release = Signer.load(private)
    nodes = []
    for i in range(2):
        fill_store(root / f"node{i}" / "models", model_files)
        for manifest in (root / f"node{i}" / "models").glob("*/*/manifest.json"):
            release.sign(manifest.parent)
        nodes.append(NodeProcess(root / f"node{i}", env=env))
    config = gateway_config(root / "gateway.toml", nodes, "[operations]\nobserve_s = 0.5\n")
    with (
        running(nodes[0], EXPECTED),
        running(nodes[1], EXPECTED),
        running(GatewayProcess(root, "--config", str(config))) as gateway,
    ):
        yield Fleet(root, gateway, nodes, private)


def test_an_upgrade_goes_through_the_fleet_node_by_node(fleet: Fleet) -> None:
    wheel = fleet.signed("0.1.1")
    began = [httpx.get(f"{n.url}/admin/status").json()["started_at"] for n in fleet.nodes]
    done = fleet.upgrade(wheel)
    assert done.returncode == 0, done.stderr
    assert "n0: base -> 0.1.1-" in done.stderr
    assert "n1: base -> 0.1.1-" in done.stderr
    for node, started in zip(fleet.nodes, began, strict=True):
        status = httpx.get(f"{node.url}/admin/status").json()
        assert status["version"] == "0.1.1"
        assert status["started_at"] > started
        assert status["software"] == {"env": status["software"]["env"], "trial": False}
        software = fleet.software(node)
        assert software["current"] == software["running"] != "base"
        assert software["previous"] == "base"
        assert software["trial"] is None
        # The new environment's own edgegen is what runs, and what the fleet's scan reports (once).
        packages = httpx.get(f"{node.url}/admin/packages").json()["packages"]
        assert [p["version"] for p in packages if p["name"] == "edgegen"] == ["0.1.1"]
    answer = httpx.post(f"{fleet.gateway.url}/predict", json={"input_data": [3.0] * 64})
    assert answer.status_code == 200
    assert len(answer.json()["prediction"][0]) == 10
    # The same wheel again: staged already, running already — nothing restarts.
    again = fleet.upgrade(wheel)
    assert again.returncode == 0, again.stderr
    assert [fleet.version(n) for n in fleet.nodes] == ["0.1.1", "0.1.1"]


def test_a_version_that_cannot_start_is_left_by_the_node_itself(fleet: Fleet) -> None:
    app = (SOURCE / "node" / "app.py").read_text()
    broken = app.replace(
        "def app_from_environment() -> NodeApp:\n",
        "def app_from_environment() -> NodeApp:\n    raise RuntimeError('broken on purpose')\n",
    )
    assert broken != app
    before = [fleet.software(n)["running"] for n in fleet.nodes]
    done = fleet.upgrade(fleet.signed("0.1.2", {"node/app.py": broken}))
    assert done.returncode == 1
    assert "stopped at n0" in done.stderr
    assert "failed to start" in done.stderr
    assert [fleet.software(n)["running"] for n in fleet.nodes] == before  # n1 never touched
    failure = fleet.software(fleet.nodes[0])["last_failure"]
    assert failure is not None
    assert failure["env"].startswith("0.1.2-")
    assert [fleet.version(n) for n in fleet.nodes] == ["0.1.1", "0.1.1"]


def test_a_version_that_fails_its_probe_is_rolled_back(fleet: Fleet) -> None:
    v2 = (SOURCE / "node" / "v2.py").read_text()
    broken = v2.replace(  # every inference (the probe's too) fails
        ") -> tuple[bytes, list[tuple[bytes, bytes]]]:\n",
        ") -> tuple[bytes, list[tuple[bytes, bytes]]]:\n    raise RuntimeError('broken on purpose')\n",
    )
    assert broken != v2
    done = fleet.upgrade(fleet.signed("0.1.3", {"node/v2.py": broken}))
    assert done.returncode == 1, done.stderr
    assert "stopped at n0" in done.stderr
    assert "probe inference answered 500" in done.stderr
    assert "n0: back to 0.1.1-" in done.stderr
    assert [fleet.version(n) for n in fleet.nodes] == ["0.1.1", "0.1.1"]
    software = fleet.software(fleet.nodes[0])
    assert software["trial"] is None
    assert software["current"] == software["running"]
    assert "rolled back" in str(software["last_failure"])


def test_an_unconfirmed_version_leaves_and_an_explicit_rollback_goes_back(fleet: Fleet) -> None:
    node = fleet.nodes[1]
    wheel = fleet.signed("0.1.4")
    headers = {"x-edgegen-signature": Path(f"{wheel}.sig").read_text()}
    staged = httpx.put(
        f"{node.url}/admin/software/wheels/{wheel.name}",
        content=wheel.read_bytes(),
        headers=headers,
        timeout=300,
    )
    assert staged.status_code == 201, staged.text
    env = staged.json()["env"]
    # Straight to the node, short trial, nobody confirms: it runs the new version, then leaves it.
    httpx.patch(f"{node.url}/admin/config", json={"changes": {"software.trial_s": 2}}).raise_for_status()
    assert httpx.post(f"{node.url}/admin/software/switch", json={"env": env}).status_code == 202
    assert _wait(lambda: fleet.version(node) == "0.1.4")
    assert fleet.software(node)["trial"]["env"] == env  # type: ignore[index]
    assert _wait(lambda: fleet.version(node) == "0.1.1" and fleet.software(node)["trial"] is None)
    assert "not confirmed" in str(fleet.software(node)["last_failure"])
    # An explicit rollback: confirmed 0.1.1 goes back to the base install, on trial, then confirmed.
    assert httpx.post(f"{node.url}/admin/software/rollback").status_code == 202
    assert _wait(lambda: fleet.software(node)["running"] == "base")
    assert httpx.post(f"{node.url}/admin/software/confirm").status_code == 200
    software = fleet.software(node)
    assert software["current"] == "base"
    assert software["previous"] != "base"
    assert fleet.version(node) == "0.1.0"


def test_unsigned_forged_and_hostile_uploads_change_nothing(fleet: Fleet, tmp_path: Path) -> None:
    node = fleet.nodes[0]
    wheel = fleet.signed("0.1.5")
    data, signature = wheel.read_bytes(), Path(f"{wheel}.sig").read_text()
    other_key, _ = _key_pair(tmp_path)
    forged = subprocess.run(
        [sys.executable, "-m", "edgegen", "software", "sign", str(wheel), "--key", str(other_key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert forged.returncode == 0
    cases = [
        (wheel.name, data, {}, 400),  # no signature
        (wheel.name, data, {"x-edgegen-signature": Path(f"{wheel}.sig").read_text()}, 422),  # untrusted key
        (wheel.name, data + b"x", {"x-edgegen-signature": signature}, 422),  # tampered
        (wheel.name, data, {"x-edgegen-signature": "{not json"}, 422),
        ("evil-1.0-py3-none-any.whl", data, {"x-edgegen-signature": signature}, 400),
        ("..%2Fedgegen-0.1.5-py3-none-any.whl", data, {"x-edgegen-signature": signature}, 400),
        ("edgegen-0.1.5-py3-none-any.whl", b"", {"x-edgegen-signature": signature}, 400),
    ]
    for name, body, headers, expected in cases:
        answer = httpx.put(f"{node.url}/admin/software/wheels/{name}", content=body, headers=headers)
        assert answer.status_code in (expected, 404), (name, answer.status_code, answer.text)
        assert "error" in answer.json()
    bad = [
        httpx.post(f"{node.url}/admin/software/switch", json={"env": "../../bin"}),
        httpx.post(f"{node.url}/admin/software/switch", json={"env": "9.9.9-00000000"}),
        httpx.post(f"{node.url}/admin/software/switch", json={"env": 7}),
        httpx.post(f"{node.url}/admin/software/confirm"),  # nothing on trial
    ]
    assert [a.status_code for a in bad] == [400, 404, 400, 409]
    through_gateway = httpx.post(
        f"{fleet.gateway.url}/gateway/upgrade", content=data, headers={"x-edgegen-wheel": wheel.name}
    )
    assert through_gateway.status_code == 400  # no signature header
    assert not (node.home / "software" / "wheels" / "evil-1.0-py3-none-any.whl").exists()
    assert [fleet.version(n) for n in fleet.nodes] == ["0.1.1", "0.1.0"]
    assert httpx.post(f"{fleet.gateway.url}/predict", json={"input_data": [3.0] * 64}).status_code == 200


def _wait(check: object, timeout: float = 90) -> bool:
    assert callable(check)
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        try:
            if check():
                return True
        except (httpx.TransportError, KeyError, TypeError):
            pass
        time.sleep(0.2)
    return False


def _package(store_root: Path, model: Path, out: Path, signer: Signer | None) -> Path:
    """A package archive of `model` (what `edgegen models export` writes), signed by `signer`."""
    ModelStore(store_root, describe=describe_model).add(model, "digits")
    package = store_root / "digits" / "1"
    if signer is not None:
        signer.sign(package)
    with tarfile.open(out, "w:gz") as archive:
        for file in package.iterdir():
            archive.add(file, arcname=file.name)
    return out


def test_a_pushed_model_package_rolls_out_and_an_unsigned_one_stops(
    fleet: Fleet, tmp_path: Path, model_files: dict[str, Path]
) -> None:
    signed = _package(tmp_path / "a", model_files["onnx"], tmp_path / "digits.tar.gz", Signer.load(fleet.key))
    command = [sys.executable, "-m", "edgegen", "admin", "rollout", "digits", "--gateway", fleet.gateway.url]
    done = subprocess.run(
        [*command, "--package", str(signed), "--version", "7"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "n0: 1 -> 7" in done.stderr
    assert "n1: 1 -> 7" in done.stderr
    assert fleet.served() == ["7", "7"]
    assert httpx.post(f"{fleet.gateway.url}/predict", json={"input_data": [3.0] * 64}).status_code == 200
    unsigned = _package(tmp_path / "b", model_files["onnx"], tmp_path / "unsigned.tar.gz", None)
    refused = subprocess.run(
        [*command, "--package", str(unsigned)], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 1
    assert "stopped at n0" in refused.stderr
    assert "not signed" in refused.stderr
    garbage = httpx.post(f"{fleet.gateway.url}/gateway/models/digits/rollout", content=b"not an archive")
    assert garbage.json()["ok"] is False
    assert "not a package archive" in garbage.json()["reason"]
    gateway = f"{fleet.gateway.url}/gateway/models"
    hostile = {
        f"{gateway}/digits/rollout": (b"", 400),  # empty
        f"{gateway}/Digits!/rollout": (b"x", 400),  # not a model name
        f"{gateway}/digits/rollout?version=Bad!": (b"x", 400),
        f"{gateway}/..%2Fetc/rollout": (b"x", 400),  # an encoded slash: no plain path (security/paths.py)
        f"{gateway}/digits/rollout?version=../1": (b"x", 404),  # traversal: the gate says nothing more
    }
    for url, (body, status) in hostile.items():
        answer = httpx.post(url, content=body)
        assert answer.status_code == status, (url, answer.text)
        assert "error" in answer.json()
    assert fleet.served() == ["7", "7"]
    back = subprocess.run(
        [*command[:4], "rollback", "digits", *command[6:]], capture_output=True, text=True, timeout=300
    )
    assert back.returncode == 0, back.stderr
    assert fleet.served() == ["1", "1"]
