"""Pulling a model package by URL: only from the operator's sources, never an SSRF.

A real HTTPS file server on loopback (its certificate from the fleet's CA) serves a signed package, an
unsigned one and a redirect; the node allows that server by IP literal, and `localhost` on the same
port by name — which resolves to loopback and is therefore still refused."""

from __future__ import annotations

import http.server
import json
import ssl
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgegen.executors import describe_model
from edgegen.security.pki import Pki
from edgegen.store import ModelStore
from tests.e2e.node_process import free_port, running
from tests.security.conftest import Fleet, SecureNode, error_of


def package_archive(source: Path, out: Path) -> bytes:
    with tarfile.open(out, "w:gz") as archive:
        for file in source.iterdir():
            archive.add(file, arcname=file.name)
    return out.read_bytes()


@pytest.fixture(scope="module")
def files(
    fleet: Fleet, tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[int]:
    root = tmp_path_factory.mktemp("files")
    signed = package_archive(fleet.home / "models" / "digits" / "1", root / "signed.tar.gz")
    ModelStore(root / "plain", describe=describe_model).add(model_files["onnx"], "digits")
    unsigned = package_archive(root / "plain" / "digits" / "1", root / "unsigned.tar.gz")
    served = {"/models/digits.tar.gz": signed, "/models/unsigned.tar.gz": unsigned}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/models/redirect.tar.gz":
                self.send_response(302)
                self.send_header("Location", "/models/digits.tar.gz")
                self.end_headers()
                return
            body = served.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            return None

    issued = Pki(fleet.pki).issue("files", "node", hosts=("127.0.0.1", "localhost"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def puller(fleet: Fleet, files: int) -> Iterator[SecureNode]:
    sources = json.dumps([f"https://127.0.0.1:{files}/models/", f"https://localhost:{files}/models/"])
    env = {
        "EDGEGEN_SECURITY__MODEL_SOURCES": sources,
        "EDGEGEN_SECURITY__MODEL_SOURCES_CA": str(fleet.pki / "ca.crt"),
    }
    with running(SecureNode(fleet, **env)) as process:
        yield process


def pull(fleet: Fleet, node: SecureNode, url: str, **extra: object) -> httpx.Response:
    with fleet.admin_client() as client:
        return client.post(f"{node.url}/admin/models/pulled/pull", json={"url": url, **extra})


def test_a_signed_package_from_an_allowed_source_is_added_and_served(
    fleet: Fleet, puller: SecureNode, files: int
) -> None:
    response = pull(fleet, puller, f"https://127.0.0.1:{files}/models/digits.tar.gz", activate=True)
    assert response.status_code == 201, response.text
    assert response.json()["activated"] is True
    predicted = httpx.post(
        f"{puller.url}/models/pulled/predict", json={"input_data": [0.0] * 64}, verify=puller.verify,
        headers=fleet.headers("user"),
    )  # fmt: skip
    assert predicted.status_code == 200


@pytest.mark.parametrize(
    ("url", "status", "reason"),
    [
        ("file:///etc/passwd", 400, "https"),
        ("http://127.0.0.1:{port}/models/digits.tar.gz", 403, "not under"),
        ("https://169.254.169.254/latest/meta-data/x.tar.gz", 403, "not under"),
        ("https://10.0.0.1/models/x.tar.gz", 403, "not under"),
        ("https://[::1]:{port}/models/digits.tar.gz", 403, "not under"),
        ("https://localhost:{port}/models/digits.tar.gz", 403, "loopback, link-local or private"),
        ("https://127.0.0.1:{port}/models/../secret.tar.gz", 400, ".."),
        ("https://127.0.0.1:{port}/models/%2e%2e/secret.tar.gz", 400, ".."),
        ("https://127.0.0.1:{port}/models%2f..%2fsecret.tar.gz", 400, ".."),
        ("https://user:pw@127.0.0.1:{port}/models/digits.tar.gz", 400, "user info"),
        ("https://127.0.0.1:{port}/models/redirect.tar.gz", 403, "redirect"),
        ("https://127.0.0.1:{port}/models/unsigned.tar.gz", 422, "not signed"),
        ("https://127.0.0.1:{port}/models/missing.tar.gz", 422, "answered 404"),
        ("https://127.0.0.1:{port}/models/digits.onnx", 400, "archive"),
    ],
    ids=[
        "file",
        "http",
        "metadata",
        "private",
        "ipv6-loopback",
        "name-to-loopback",
        "dotdot",
        "encoded-dotdot",
        "encoded-slash",
        "userinfo",
        "redirect",
        "unsigned",
        "missing",
        "not-an-archive",
    ],
)
def test_hostile_sources_are_refused(
    fleet: Fleet, puller: SecureNode, files: int, url: str, status: int, reason: str
) -> None:
    response = pull(fleet, puller, url.format(port=files))
    assert response.status_code == status, response.text
    assert reason in error_of(response)


def test_a_node_without_sources_pulls_nothing(fleet: Fleet, node: SecureNode, files: int) -> None:
    response = pull(fleet, node, f"https://127.0.0.1:{files}/models/digits.tar.gz")
    assert response.status_code == 403
    assert "fetches no models by URL" in error_of(response)
