"""Nodes ship their logs to a gateway over mutual TLS with their own certificate, and hold no key: the
certificate is taken for `POST /gateway/logs` alone, for that node's own lines, and not in the audit log's
stream of admin changes."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from edgegen.security.audit import AuditLog
from tests.e2e.node_process import GatewayProcess, free_port, running
from tests.security.conftest import Fleet, SecureNode, security_env


class SecureGateway(GatewayProcess):
    scheme = "https"


@pytest.fixture(scope="module")
def shipping(fleet: Fleet) -> Iterator[tuple[SecureNode, SecureGateway]]:
    pki = fleet.pki
    port = free_port()
    node = SecureNode(
        fleet,
        EDGEGEN_LOGS__SHIP_TO=f"https://127.0.0.1:{port}",
        EDGEGEN_LOGS__NODE="node1",
        EDGEGEN_LOGS__CA_FILE=str(pki / "ca.crt"),
        EDGEGEN_LOGS__CERT_FILE=str(pki / "node1.crt"),
        EDGEGEN_LOGS__KEY_FILE=str(pki / "node1.key"),
        EDGEGEN_LOGS__INTERVAL_S="0.2",
    )
    config = fleet.home / f"gateway-shipping-{port}.toml"
    config.write_text(
        f'[[nodes]]\nurl = "https://127.0.0.1:{node.port}"\nname = "node1"\n'
        f'[nodes_tls]\nca_file = "{pki / "ca.crt"}"\n'
        f'cert_file = "{pki / "gw.crt"}"\nkey_file = "{pki / "gw.key"}"\n'
        f'[tls]\ncert_file = "{pki / "gw.crt"}"\nkey_file = "{pki / "gw.key"}"\n'
        f'client_ca_file = "{pki / "ca.crt"}"\nclient_certs = "optional"\n'
        "[alerts]\nevaluate_s = 0.2\n"
    )
    env = {
        **security_env(fleet, "EDGEGEN_GATEWAY_"),
        "EDGEGEN_GATEWAY_SECURITY__BAN_AFTER_FAILURES": "100000",
    }
    gateway = SecureGateway(fleet.home, "--config", str(config), env=env, port=port, auth=True)
    gateway.verify = fleet.client_tls()
    with running(node), running(gateway):
        yield node, gateway


def as_node(fleet: Fleet, cert: str = "node1") -> httpx.Client:
    return httpx.Client(verify=fleet.client_tls(cert), timeout=10)


def test_a_node_ships_with_its_certificate_and_no_key(
    fleet: Fleet, shipping: tuple[SecureNode, SecureGateway]
) -> None:
    node, gateway = shipping
    answer = httpx.post(
        f"{node.url}/predict",
        json={"input_data": [1.0] * 64},
        headers=fleet.headers("user"),
        verify=node.verify,
    )
    assert answer.status_code == 200
    rid = answer.headers["x-request-id"]
    with fleet.admin_client() as admin:
        until = time.monotonic() + 30
        found: list[dict[str, object]] = []
        while not found and time.monotonic() < until:
            found = admin.get(f"{gateway.url}/gateway/logs", params={"request_id": rid}).json()["lines"]
            time.sleep(0.2)
        assert found
        assert found[0]["node"] == "node1"
        assert admin.patch(f"{gateway.url}/gateway/nodes/node1", json={"weight": 2}).status_code == 200
    audit = AuditLog(fleet.home / "security" / "audit.sqlite")  # the gateway's (and the node's) audit log
    try:
        actions = [entry.action for entry in audit.tail(1000)]
    finally:
        audit.close()
    assert "PATCH /gateway/nodes/node1" in actions  # an admin change is there
    assert not [a for a in actions if "/gateway/logs" in a]  # the log batches, a few a second, are not


def test_a_node_certificate_ships_its_own_lines_and_does_nothing_else(
    fleet: Fleet, shipping: tuple[SecureNode, SecureGateway]
) -> None:
    _, gateway = shipping
    batch = {
        "node": "node2",
        "spool": "abc",
        "entries": [[1, {"ts": time.time(), "level": "info", "msg": "forged"}]],
    }
    with as_node(fleet) as client:
        forged = client.post(f"{gateway.url}/gateway/logs", content=orjson.dumps(batch))
        assert forged.status_code == 403
        assert client.get(f"{gateway.url}/gateway/logs").status_code == 401  # reading takes a key
        assert client.get(f"{gateway.url}/gateway/fleet").status_code == 401
        assert client.post(f"{gateway.url}/gateway/restart").status_code == 401
    with as_node(fleet, "alice") as client:  # a user's certificate is no node's
        assert client.post(f"{gateway.url}/gateway/logs", content=orjson.dumps(batch)).status_code == 401
    other = ssl.create_default_context(cafile=str(fleet.pki / "ca.crt"))
    other.load_cert_chain(fleet.home / "other-ca" / "ops.crt", fleet.home / "other-ca" / "ops.key")
    with pytest.raises(httpx.TransportError), httpx.Client(verify=other) as client:
        client.post(f"{gateway.url}/gateway/logs", content=orjson.dumps(batch))


def test_lines_are_searched_by_trace_id_and_only_a_trace_id_is_taken(
    fleet: Fleet, shipping: tuple[SecureNode, SecureGateway]
) -> None:
    """What a node ships is data, whatever it holds where a trace id goes; the search takes 32 hex digits
    and nothing else (400, and the store answers the same afterwards)."""
    _, gateway = shipping
    trace = "5a" * 16
    lines = [
        {"level": "info", "msg": "kept", "trace_id": trace},
        {"level": "info", "msg": "hostile", "trace_id": "' OR '1'='1"},
        {"level": "info", "msg": "not text", "trace_id": {"$ne": None}},
    ]
    batch = {"node": "node1", "spool": "traces", "entries": [[i + 1, line] for i, line in enumerate(lines)]}
    with as_node(fleet) as client:
        assert client.post(f"{gateway.url}/gateway/logs", content=orjson.dumps(batch)).status_code == 200
    with fleet.admin_client() as admin:
        found = admin.get(f"{gateway.url}/gateway/logs", params={"trace_id": trace}).json()["lines"]
        assert [line["msg"] for line in found] == ["kept"]
        for bad in ("' OR '1'='1", "%", "*", trace.upper(), trace + "\n", trace[:31] + "g"):
            answer = admin.get(f"{gateway.url}/gateway/logs", params={"trace_id": bad})
            assert answer.status_code == 400, bad
            assert "trace_id" in answer.json()["error"]
        again = admin.get(f"{gateway.url}/gateway/logs", params={"trace_id": trace}).json()["lines"]
        assert again == found


def test_hostile_access_lines_are_data_to_the_analysis(
    fleet: Fleet, shipping: tuple[SecureNode, SecureGateway]
) -> None:
    """The analysis reads a node's access lines back from the store: a status, duration or model of any
    shape is counted when it is one and passed over when it is not, never fails a round, and a real spike
    beside them is still found."""
    _, gateway = shipping
    access = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "level": "info",
              "logger": "edgegen.access", "msg": "request"}  # fmt: skip
    hostile = [
        {"status": "503", "ms": 1.0, "model": "digits"},
        {"status": {"$gt": 0}, "ms": "fast", "model": ["digits"]},
        {"status": 503.5, "ms": {"x": 1}, "model": {"$ne": None}},
        {"status": 9_223_372_036_854_775_807, "ms": -1e308, "model": "<script>alert(1)</script>"},
        {"status": None, "ms": None, "model": "x" * 4096},
    ]
    spike = [{"status": 503, "ms": 2.0, "model": "spiked"}] * 30
    lines = [{**access, **line} for line in hostile + spike]
    batch = {"node": "node1", "spool": "hostile", "entries": [[i + 1, line] for i, line in enumerate(lines)]}
    with as_node(fleet) as client:
        assert client.post(f"{gateway.url}/gateway/logs", content=orjson.dumps(batch)).status_code == 200
    with fleet.admin_client() as admin:
        until, found = time.monotonic() + 15, []
        while not found and time.monotonic() < until:
            alerts = admin.get(f"{gateway.url}/gateway/alerts")
            assert alerts.status_code == 200
            found = [a for a in alerts.json()["active"] if a["model"] == "spiked"]
            time.sleep(0.2)
        assert [(a["kind"], a["node"], a["requests"]) for a in found] == [("error_spike", "node1", 30)]
        assert admin.get(f"{gateway.url}/metrics").status_code == 200
    assert "log analysis failed" not in gateway.log()
