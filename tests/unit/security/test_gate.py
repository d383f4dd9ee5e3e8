"""The security gate's pure decisions: which role a path needs, which networks pass, what a gateway
may vouch for — and the gate itself on an ASGI scope, no server needed."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edgegen.gateway.target import Target
from edgegen.security.audit import AuditLog
from edgegen.security.auth import Authenticator, Principal, required_role
from edgegen.security.gate import SecurityGate, SecurityMetrics, bearer, peer_role
from edgegen.security.keys import KeyStore
from edgegen.security.settings import SecuritySettings, TlsSettings, exposure_problem
from tests.gates import noting_gate


@pytest.mark.parametrize(
    ("method", "raw", "path", "role"),
    [
        ("GET", b"/v2/health/live", "/v2/health/live", None),
        ("HEAD", b"/metrics", "/metrics", None),
        ("POST", b"/metrics", "/metrics", "user"),
        ("GET", b"/v2/health%2flive", "/v2/health/live", "user"),  # not the public path, byte for byte
        ("GET", b"/admin%2fmodels", "/admin/models", "operator"),  # decoded reading wins
        ("POST", b"/admin/models/x/activate", "/admin/models/x/activate", "operator"),
        ("POST", b"/admin/keys", "/admin/keys", "admin"),
        ("PUT", b"/admin/software/wheels/w.whl", "/admin/software/wheels/w.whl", "admin"),  # code to run
        ("POST", b"/admin%2Fsoftware/switch", "/admin/software/switch", "admin"),
        ("GET", b"/admin/software", "/admin/software", "operator"),
        ("GET", b"/gateway/nodes", "/gateway/nodes", "operator"),
        ("DELETE", b"/gateway/nodes/a", "/gateway/nodes/a", "admin"),
        ("POST", b"/predict", "/predict", "user"),
    ],
)
def test_required_role(method: str, raw: bytes, path: str, role: str | None) -> None:
    assert required_role(method, raw, path) == role


def test_a_principal_travels_through_its_header() -> None:
    principal = Principal("key:ab12cd34", "user", ("digits",), "acme")
    assert Principal.from_header(principal.to_header()) == principal
    for forged in (b"{", b'{"sub":"x","role":"root","models":null,"tenant":null}', b"[]", b'{"sub":"x"}'):
        assert Principal.from_header(forged) is None


def test_bearer_and_peer_role() -> None:
    assert bearer([(b"authorization", b"Bearer abc")]) == ("abc", None)
    assert bearer([(b"authorization", b"Basic abc")]) == ("", None)
    assert bearer([]) == (None, None)
    tls = {"extensions": {"tls": {"client_cert_name": "CN=gw,OU=gateway"}}}
    assert peer_role(tls) == "gateway"
    assert peer_role({}) is None


def test_exposure() -> None:
    security, tls = SecuritySettings(), TlsSettings()
    assert exposure_problem("127.0.0.1", security, tls) is None
    assert "without TLS" in (exposure_problem("0.0.0.0", security, tls) or "")
    assert exposure_problem("0.0.0.0", security.model_copy(update={"insecure": True}), tls) is None
    with_tls = TlsSettings(cert_file=Path("a"), key_file=Path("b"))
    assert exposure_problem("10.0.0.1", security, with_tls) is None
    no_auth = security.model_copy(update={"auth": False})
    assert "authentication" in (exposure_problem("10.0.0.1", no_auth, with_tls) or "")


class _Sink:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @staticmethod
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}


def _gate(tmp_path: Path, **settings: Any) -> tuple[SecurityGate, str, list[Principal]]:
    keys = KeyStore(tmp_path / "keys.sqlite")
    token = keys.create("user", models=("digits",))[0]
    gate, seen = noting_gate(SecuritySettings(**settings), Authenticator(keys, None))
    return gate, token, seen


def _request(gate: SecurityGate, path: str, client: str = "10.1.2.3", token: str | None = None) -> int:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "client": (client, 5000)}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    sink = _Sink()
    asyncio.run(gate(scope, receive, sink))
    return sink.status


def test_the_gate_on_a_scope(tmp_path: Path) -> None:
    gate, token, seen = _gate(tmp_path, deny_networks=[ipaddress.ip_network("192.168.0.0/16")])
    assert _request(gate, "/predict") == 401
    assert _request(gate, "/predict", token=token) == 200
    assert seen[-1].models == ("digits",)
    assert _request(gate, "/predict", client="192.168.7.7", token=token) == 403
    assert _request(gate, "/admin/models", token=token) == 403
    assert _request(gate, "/.env", token=token) == 404


def test_allow_list_and_ban(tmp_path: Path) -> None:
    gate, token, _ = _gate(
        tmp_path, allow_networks=[ipaddress.ip_network("10.0.0.0/8")], ban_after_failures=3
    )
    assert _request(gate, "/predict", client="172.16.0.1", token=token) == 403
    for _ in range(3):
        assert _request(gate, "/predict", token="eg_wrong") == 401
    assert _request(gate, "/predict", token=token) == 403  # banned, even with a good key
    assert _request(gate, "/predict", client="10.9.9.9", token=token) == 200  # another address is not
    assert gate.metrics.bans._value.get() == 1


def test_an_admin_change_is_in_the_audit_log_before_its_caller_hears_of_it(tmp_path: Path) -> None:
    # A client that reads the log right after its answer finds its change there (it raced before).
    keys = KeyStore(tmp_path / "keys.sqlite")
    token = keys.create("operator")[0]
    audit = AuditLog(tmp_path / "audit.sqlite")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = SecurityGate(
        app, SecuritySettings(), Authenticator(keys, None), audit, SecurityMetrics(CollectorRegistry())
    )
    logged_at_start: list[list[str]] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            logged_at_start.append([entry.action for entry in audit.tail(10)])

    path = "/admin/models/digits/activate"
    headers = [(b"authorization", f"Bearer {token}".encode())]
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "client": ("10.1.2.3", 5000)}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    try:
        asyncio.run(gate(scope, receive, send))
        assert logged_at_start == [[f"POST {path}"]]
        assert [entry.action for entry in audit.tail(10)] == [f"POST {path}"]  # once, not again at the end
    finally:
        audit.close()


def test_a_remembered_reading_of_a_path_still_counts_every_probe(tmp_path: Path) -> None:
    """Each raw path is read once (canonical form, scan verdict); a probe repeated is refused and counted
    each time, so it still bans."""
    gate, token, _ = _gate(tmp_path, ban_after_failures=3)
    assert _request(gate, "/a/../predict", token=token) == 400
    assert _request(gate, "/a/../predict", token=token) == 400
    assert _request(gate, "/.env", token=token) == 404
    assert _request(gate, "/predict", token=token) == 403  # three probes: banned
    assert _request(gate, "/.env?x=1", client="10.7.7.7", token=token) == 404
    assert _request(gate, "/predict?q=/etc/passwd", client="10.8.8.8", token=token) == 404  # the query too


def test_long_paths_are_not_remembered(tmp_path: Path) -> None:
    """A flood of long, new paths holds no memory: only paths up to 512 bytes are remembered."""
    gate, token, _ = _gate(tmp_path)
    for n in range(50):
        assert _request(gate, f"/models/m{n}/predict" + "x" * 600, token=token) in (403, 404)
    assert _request(gate, "/predict", token=token) == 200
    remembered = [*gate._readings, *(raw for _, raw in gate._roles)]
    assert remembered == [b"/predict"] * 2


def test_the_relay_takes_the_gates_one_reading_of_the_path(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.sqlite")
    token = keys.create("user", models=("digits",))[0]
    targets: list[Target] = []

    async def relay(scope: dict[str, Any], receive: Any, send: Any) -> None:
        targets.append(Target.of(scope))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = SecurityGate(
        relay, SecuritySettings(), Authenticator(keys, None), None, SecurityMetrics(CollectorRegistry())
    )
    scope = {"type": "http", "method": "POST", "path": "/models/digits/predict", "query_string": b"",
             "raw_path": b"/models/dig%69ts/predict", "client": ("10.1.2.3", 5000),
             "headers": [(b"authorization", f"Bearer {token}".encode())]}  # fmt: skip
    sink = _Sink()
    asyncio.run(gate(scope, _Sink.receive, sink))
    assert sink.status == 200
    assert scope["edgegen.path"] == targets[0].path == "/models/digits/predict"
