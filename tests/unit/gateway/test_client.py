"""The operator's gateway client against a real HTTP server on loopback: what it sends, and one clear
error for every way a call fails."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgegen.errors import EdgegenError
from edgegen.gateway.client import GatewayClient


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request with what it received, or with 403 on /refused."""

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/refused":
            self.send_response(403)
            self.end_headers()
            self.wfile.write(b'{"error": "admin only"}')
            return
        seen = {
            "method": self.command,
            "path": self.path,
            "authorization": self.headers.get("Authorization"),
            "type": self.headers.get("Content-Type"),
            "wheel": self.headers.get("X-Edgegen-Wheel"),
            "body": body.decode(),
        }
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(seen).encode())

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_PATCH(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def gateway_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_call_sends_its_key_its_query_and_its_json(gateway_url: str) -> None:
    gateway = GatewayClient(gateway_url, key="eg_secret")
    seen = gateway.get("/gateway/logs", level="error", node=None, limit=5)
    assert seen["path"] == "/gateway/logs?level=error&limit=5"  # None left out
    assert seen["authorization"] == "Bearer eg_secret"
    sent = gateway.call("PATCH", "/gateway/config", {"changes": {"cache.ttl_s": 60}})
    assert (sent["method"], sent["type"]) == ("PATCH", "application/json")
    assert json.loads(sent["body"]) == {"changes": {"cache.ttl_s": 60}}


def test_an_upload_streams_a_file_with_its_headers(gateway_url: str, tmp_path: Path) -> None:
    archive = tmp_path / "digits-7.tar.gz"
    archive.write_bytes(b"package bytes")
    with archive.open("rb") as data:
        seen = GatewayClient(gateway_url).upload("/up", data, {"X-Edgegen-Wheel": "w.whl"}, version="7")
    assert seen["path"] == "/up?version=7"
    assert seen["type"] == "application/octet-stream"
    assert (seen["wheel"], seen["body"]) == ("w.whl", "package bytes")
    assert seen["authorization"] is None


def test_failures_are_one_clear_error(gateway_url: str) -> None:
    with pytest.raises(EdgegenError, match=r'the gateway answered 403: \{"error": "admin only"\}'):
        GatewayClient(gateway_url).call("POST", "/refused")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(EdgegenError, match=f"cannot reach the gateway at {re.escape(nowhere)}"):
        GatewayClient(nowhere).get("/gateway/audit")
    with pytest.raises(EdgegenError, match="must be an http:// or https:// URL"):
        GatewayClient("file:///etc/passwd")
