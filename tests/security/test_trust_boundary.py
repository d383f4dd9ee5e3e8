"""The gate and the gateway↔node trust boundary, on real processes in the two shipped shapes.

- The documented fleet (docs/operations.md quickstart, deploy/compose.yaml): nodes on loopback with
  authentication off behind a gateway that authenticates, no TLS between them.
- The mutual-TLS fleet of tests/security/conftest.py: the node authenticates, the gateway shows its
  certificate.

Findings of issue 14: a probe through the gateway made the node ban the gateway (6); behind the gateway a
key's model scope and tenant were not enforced (7); an auth-off node took cross-site admin changes (14);
a public scrape and the API schema told the Python and edgegen versions and the model names (16).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    generate_latest,
)

from edgegen import __version__
from edgegen.executors import describe_model
from edgegen.observe.metrics import PublicView
from edgegen.security.auth import Authenticator, Principal
from edgegen.security.gate import SecurityGate, forwarded_for
from edgegen.security.keys import KeyStore
from edgegen.security.origin import SameOrigin
from edgegen.security.settings import SecuritySettings
from edgegen.store import ModelStore
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import GatewayProcess, NodeProcess, gateway_config, running
from tests.gates import noting_gate
from tests.llm_models import write_tiny_llama
from tests.security.conftest import Fleet, SecureNode, error_of

SAMPLE = {"input_data": [0.5] * 64}
CHAT = {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
PROBER, BYSTANDER = "127.0.0.2", "127.0.0.3"  # two "remote" clients of the gateway (loopback is 127/8)


@dataclass
class Documented:
    """The quickstart's fleet: one auth-off node on loopback behind a gateway with authentication."""

    node: NodeProcess
    gateway: GatewayProcess
    keys: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def client(self, who: str, address: str = "127.0.0.1") -> httpx.Client:
        """A client of the gateway calling from `address`, with `who`'s key."""
        transport = httpx.HTTPTransport(local_address=address)
        return httpx.Client(
            base_url=self.gateway.url, headers=self.headers(who), transport=transport, timeout=30
        )


def llm_home(root: Path, model_files: dict[str, Path]) -> Path:
    store = ModelStore(root / "models", describe=describe_model)
    store.add(model_files["onnx"], "digits")
    store.add(write_tiny_llama(root / "tiny.gguf"), "tiny-llm", task="text-generation")
    return root


def make_keys(home: Path) -> dict[str, str]:
    store = KeyStore(home / "security" / "keys.sqlite")
    try:
        return {
            label: store.create(role, models=models, tenant=tenant, label=label)[0]  # type: ignore[arg-type]
            for label, role, models, tenant in [
                ("acme", "user", None, "acme"),
                ("beta", "user", None, "beta"),
                ("digits-only", "user", ("digits",), "acme"),
                ("llm-only", "user", ("tiny-llm",), "beta"),
                ("operator", "operator", None, None),
            ]
        }
    finally:
        store.close()


@pytest.fixture(scope="module")
def documented(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[Documented]:
    root = tmp_path_factory.mktemp("documented")
    node = NodeProcess(llm_home(root / "node", model_files), env={**LLM_ENV, "EDGEGEN_STORE_POLL_S": "0"})
    gateway_home = root / "gateway"
    keys = make_keys(gateway_home)
    config = gateway_config(root / "gateway.toml", [node])
    # The gateway's clients here stand for remote machines (127.0.0.2, .3): it trusts no proxy in front of
    # it and spares only 127.0.0.1 (the tests' own calls) from bans, as a public gateway spares its loopback.
    env = {
        "EDGEGEN_GATEWAY_SECURITY__TRUSTED_PROXIES": "[]",
        "EDGEGEN_GATEWAY_SECURITY__NEVER_BAN": '["127.0.0.1/32"]',
    }
    gateway = GatewayProcess(gateway_home, "--config", str(config), env=env, auth=True)
    with running(node), running(gateway):
        yield Documented(node, gateway, keys)


# -- 6: ban amplification ------------------------------------------------------------------------------
def test_probes_through_the_gateway_ban_the_prober_not_the_gateway(documented: Documented) -> None:
    with documented.client("acme", PROBER) as prober, documented.client("beta", BYSTANDER) as bystander:
        assert bystander.post("/predict", json=SAMPLE).status_code == 200
        for _ in range(10):
            assert prober.get("/%2eenv").status_code in (400, 403, 404)
        refused = prober.post("/predict", json=SAMPLE)
        assert refused.status_code == 403, refused.text
        assert "banned" in error_of(refused)
        assert "x-edgegen-node" not in refused.headers  # the gateway's own refusal, not a node's
        served = bystander.post("/predict", json=SAMPLE)
        assert served.status_code == 200, served.text  # the node did not ban the gateway


def test_a_node_counts_a_proxied_failure_against_the_client_the_proxy_names(documented: Documented) -> None:
    """The node's loopback is a trusted proxy by default: its X-Forwarded-For names whom to count."""
    url = documented.node.url
    for _ in range(10):
        assert httpx.get(f"{url}/.env", headers={"X-Forwarded-For": "198.51.100.7"}).status_code == 404
    banned = httpx.get(f"{url}/v2", headers={"X-Forwarded-For": "198.51.100.7"})
    assert banned.status_code == 403
    assert "banned" in error_of(banned)
    assert httpx.get(f"{url}/v2", headers={"X-Forwarded-For": "10.0.0.1, 198.51.100.8"}).status_code == 200
    for _ in range(12):  # the proxy itself (loopback, no X-Forwarded-For) is never counted
        assert httpx.get(f"{url}/.env").status_code == 404
    assert httpx.get(f"{url}/v2").status_code == 200


def test_a_gateway_certificate_is_never_banned_the_clients_it_names_are(fleet: Fleet) -> None:
    """Mutual TLS, and no network spared: a peer with a gateway certificate is a trusted proxy."""
    strict = SecureNode(
        fleet,
        EDGEGEN_SECURITY__BAN_AFTER_FAILURES="3",
        EDGEGEN_SECURITY__NEVER_BAN="[]",
        EDGEGEN_SECURITY__TRUSTED_PROXIES="[]",
    )
    vouched = {"X-Edgegen-Principal": Principal("key:test", "user", None, "acme").to_header().decode()}
    with running(strict):
        url = strict.url
        with httpx.Client(verify=fleet.client_tls("gw"), timeout=30) as gateway:
            for _ in range(3):
                assert (
                    gateway.get(f"{url}/.env", headers={"X-Forwarded-For": "198.51.100.9"}).status_code == 404
                )
            banned = gateway.post(
                f"{url}/predict", json=SAMPLE, headers={**vouched, "X-Forwarded-For": "198.51.100.9"}
            )
            assert banned.status_code == 403
            other = gateway.post(
                f"{url}/predict", json=SAMPLE, headers={**vouched, "X-Forwarded-For": "198.51.100.10"}
            )
            assert other.status_code == 200, other.text
            for _ in range(5):
                assert gateway.get(f"{url}/.env").status_code == 404
            assert gateway.post(f"{url}/predict", json=SAMPLE, headers=vouched).status_code == 200
        # Any other certificate speaks for itself alone: its X-Forwarded-For is not believed.
        with httpx.Client(
            verify=fleet.client_tls("alice"), headers=fleet.headers("user"), timeout=30
        ) as alice:
            for _ in range(3):
                assert (
                    alice.get(f"{url}/.env", headers={"X-Forwarded-For": "198.51.100.11"}).status_code == 404
                )
            refused = alice.post(f"{url}/predict", json=SAMPLE, headers={"X-Forwarded-For": "198.51.100.12"})
            assert refused.status_code == 403
            assert "banned" in error_of(refused)


# -- 7: model scope and tenant behind the gateway ----------------------------------------------------------
def test_a_scoped_key_reaches_only_its_models_through_the_gateway(documented: Documented) -> None:
    with documented.client("digits-only") as digits, documented.client("llm-only") as llm:
        assert digits.post("/predict", json=SAMPLE).status_code == 200
        for method, path, body in [
            ("POST", "/v1/chat/completions", CHAT),
            ("GET", "/v2/models/tiny-llm", None),
            ("POST", "/models/tiny-llm/predict", SAMPLE),
            ("POST", "/v1/jobs", {"method": "POST", "url": "/v1/chat/completions", "body": CHAT}),
        ]:
            answer = digits.request(method, path, json=body)
            assert answer.status_code == 403, (path, answer.text)
            assert "may not use model 'tiny-llm'" in error_of(answer)
        assert llm.post("/predict", json=SAMPLE).status_code == 403
        assert digits.get("/v1/models").json()["data"] == []
        assert [m["id"] for m in llm.get("/v1/models").json()["data"]] == ["tiny-llm"]


def test_the_gateway_refuses_a_model_out_of_scope_itself(documented: Documented) -> None:
    """A second wall: where the path or the body names the model, no node sees the request."""
    chat = {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with documented.client("digits-only") as digits:
        for method, path, body in [
            ("POST", "/models/tiny-llm/predict", SAMPLE),
            ("GET", "/v2/models/tiny-llm/ready", None),
            ("POST", "/v1/chat/completions", chat),
            ("POST", "/v1/completions", {"model": "tiny-llm", "prompt": "hi", "max_tokens": 1}),
        ]:
            answer = digits.request(method, path, json=body)
            assert answer.status_code == 403, (path, answer.text)
            assert "x-edgegen-node" not in answer.headers


def test_another_tenants_job_is_not_found_through_the_gateway(documented: Documented) -> None:
    with documented.client("acme") as acme, documented.client("beta") as beta:
        created = acme.post("/v1/jobs", json={"method": "POST", "url": "/predict", "body": SAMPLE})
        assert created.status_code == 202, created.text
        job = created.json()["id"]
        assert acme.get(f"/v1/jobs/{job}").status_code == 200
        assert beta.get(f"/v1/jobs/{job}").status_code == 404
        assert beta.delete(f"/v1/jobs/{job}").status_code == 404


def test_another_tenants_cached_answer_is_not_served_through_the_gateway(documented: Documented) -> None:
    sample = {"input_data": [0.25] * 64}
    with documented.client("acme") as acme, documented.client("beta") as beta:
        assert acme.post("/predict", json=sample).status_code == 200
        assert acme.post("/predict", json=sample).headers["x-edgegen-cache"] == "hit"
        answer = beta.post("/predict", json=sample)
        assert answer.status_code == 200
        assert answer.headers["x-edgegen-cache"] == "miss"


def test_the_mutual_tls_gateway_keeps_tenants_apart(fleet: Fleet, gateway: GatewayProcess) -> None:
    """The other shipped shape: the node authenticates, the gateway vouches over mutual TLS."""
    acme, beta = fleet.headers("user"), fleet.headers("llm-only")
    job = {
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tiny-llm", "prompt": "a", "max_tokens": 1},
    }
    created = httpx.post(f"{gateway.url}/v1/jobs", json=job, headers=beta)
    assert created.status_code == 202, created.text
    assert httpx.get(f"{gateway.url}/v1/jobs/{created.json()['id']}", headers=acme).status_code == 404
    assert httpx.get(f"{gateway.url}/v1/jobs/{created.json()['id']}", headers=beta).status_code == 200
    assert httpx.get(f"{gateway.url}/v1/models", headers=fleet.headers("digits-only")).json()["data"] == []


# -- 14: cross-site admin changes ---------------------------------------------------------------------------
def _status(node: NodeProcess) -> dict[str, Any]:
    return httpx.get(f"{node.url}/admin/status", timeout=10).json()  # type: ignore[no-any-return]


def test_a_cross_site_restart_of_an_auth_off_node_is_refused(documented: Documented) -> None:
    node = documented.node
    before = _status(node)
    for headers in ({"Origin": "http://evil.example"}, {"Host": "evil.example"}, {"Origin": "null"}):
        answer = httpx.post(f"{node.url}/admin/restart", headers=headers)
        assert answer.status_code == 403, (headers, answer.text)
        assert "error" in answer.json()
    time.sleep(0.3)  # a restart would have begun 0.05 s after its answer
    after = _status(node)
    assert (after["pid"], after["started_at"]) == (before["pid"], before["started_at"])
    assert node.alive()


def test_a_rebinding_read_and_a_cross_site_job_are_refused_by_an_auth_off_node(
    documented: Documented,
) -> None:
    url = documented.node.url
    assert httpx.get(f"{url}/admin/config", headers={"Host": "evil.example:8000"}).status_code == 403
    assert (
        httpx.get(f"{url}/v1/jobs/job_{'0' * 24}", headers={"Host": "rebind.evil.example"}).status_code == 403
    )
    job = {"method": "POST", "url": "/predict", "body": SAMPLE}
    assert (
        httpx.post(f"{url}/v1/jobs", json=job, headers={"Origin": "https://evil.example"}).status_code == 403
    )
    assert (
        httpx.post(f"{url}/predict", json=SAMPLE, headers={"Origin": "https://evil.example"}).status_code
        == 403
    )


def test_same_origin_and_plain_admin_calls_still_work(documented: Documented) -> None:
    node, gateway = documented.node, documented.gateway
    activate = {"version": "1"}  # the version already served: a change that changes nothing
    for headers in ({}, {"Origin": node.url}, {"Host": "localhost"}, {"Host": f"localhost:{node.port}"}):
        answer = httpx.post(f"{node.url}/admin/models/digits/activate", json=activate, headers=headers)
        assert answer.status_code == 200, (headers, answer.text)
    # the gateway's own admin calls reach the node (aiohttp's Host is the node's URL)
    admin = {"Authorization": f"Bearer {gateway.admin_key}"}
    changed = httpx.patch(
        f"{gateway.url}/gateway/config", json={"changes": {"cache.ttl_s": 3600}}, headers=admin, timeout=30
    )
    assert changed.status_code == 200, changed.text
    cross = httpx.patch(
        f"{gateway.url}/gateway/config", json={"changes": {"cache.ttl_s": 3600}},
        headers={**admin, "Origin": "https://evil.example"}, timeout=30,
    )  # fmt: skip
    assert cross.status_code == 403
    # a browser on the gateway's own origin, relayed to the node: the node takes the gateway's name for it
    with documented.client("operator") as operator:
        own = operator.post("/admin/models/digits/activate", json=activate, headers={"Origin": gateway.url})
        assert own.status_code == 200, own.text
        assert own.headers["x-edgegen-node"] == "n0"
        foreign = operator.post(
            "/admin/models/digits/activate", json=activate, headers={"Origin": "https://evil.example"}
        )
        assert foreign.status_code == 403


# -- 16: what an unauthenticated scraper and a user may learn ----------------------------------------------
@dataclass
class AuthNode:
    node: NodeProcess
    keys: dict[str, str]

    def get(self, path: str, who: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.get(f"{self.node.url}{path}", headers=headers, timeout=30)


@pytest.fixture(scope="module")
def auth_node(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[AuthNode]:
    home = llm_home(tmp_path_factory.mktemp("metrics"), model_files)
    keys = make_keys(home)
    with running(NodeProcess(home, env={**LLM_ENV, "EDGEGEN_STORE_POLL_S": "0"}, auth=True)) as node:
        served = AuthNode(node, keys)
        assert httpx.post(f"{node.url}/predict", json=SAMPLE, headers=node.headers).status_code == 200
        chat = httpx.post(f"{node.url}/v1/chat/completions", json=CHAT, headers=node.headers, timeout=60)
        assert chat.status_code == 200
        yield served


def test_a_public_scrape_tells_no_versions_and_no_model_names(auth_node: AuthNode) -> None:
    public = auth_node.get("/metrics")
    assert public.status_code == 200
    text = public.text
    assert "python_info" not in text
    assert platform.python_version() not in text
    assert "digits" not in text
    assert "tiny-llm" not in text
    assert "edgegen_request_duration_seconds_count" in text  # the figures are there, summed over models
    for who in ("acme", "operator"):
        seen = auth_node.get("/metrics", who)
        assert seen.status_code == 200
        assert ("python_info" in seen.text) is (who == "operator")
        assert ('model="digits"' in seen.text) is (who == "operator")
    bad = httpx.get(f"{auth_node.node.url}/metrics", headers={"Authorization": "Bearer eg_nope"})
    assert bad.status_code == 401


def test_a_user_learns_no_version_from_the_schema_or_the_server_metadata(auth_node: AuthNode) -> None:
    schema = auth_node.get("/openapi.json", "acme")
    assert schema.status_code == 200
    assert schema.json()["info"]["version"] != __version__
    assert __version__ not in schema.text
    assert __version__ not in auth_node.get("/docs", "acme").text
    assert auth_node.get("/v2", "acme").json()["version"] != __version__
    assert auth_node.get("/v2", "operator").json()["version"] == __version__


def test_a_user_learns_no_version_through_the_gateway(documented: Documented) -> None:
    with documented.client("acme") as acme:
        assert acme.get("/v2").json()["version"] != __version__
        assert __version__ not in acme.get("/openapi.json").text


def test_model_names_and_a_key_for_metrics_are_the_operators_choice(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    ModelStore(tmp_path / "models", describe=describe_model).add(model_files["onnx"], "digits")
    operator = make_keys(tmp_path)["operator"]
    env = {"EDGEGEN_SECURITY__METRICS_MODEL_NAMES": "true", "EDGEGEN_STORE_POLL_S": "0"}
    with running(NodeProcess(tmp_path, env=env, auth=True)) as node:
        assert httpx.post(f"{node.url}/predict", json=SAMPLE, headers=node.headers).status_code == 200
        text = httpx.get(f"{node.url}/metrics").text
        assert 'model="digits"' in text
        assert "python_info" not in text
    env = {"EDGEGEN_SECURITY__METRICS_AUTH": "key", "EDGEGEN_STORE_POLL_S": "0"}
    with running(NodeProcess(tmp_path, env=env, auth=True)) as node:
        assert httpx.get(f"{node.url}/metrics").status_code == 401
        scraped = httpx.get(f"{node.url}/metrics", headers={"Authorization": f"Bearer {operator}"})
        assert scraped.status_code == 200
        assert "python_info" in scraped.text


# -- the gate's pure parts -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "client"),
    [
        ([b"198.51.100.7"], "198.51.100.7"),
        ([b"10.0.0.1, 198.51.100.7"], "198.51.100.7"),  # the last hop: the one our gateway set
        ([b"10.0.0.1", b"2001:db8::1"], "2001:db8::1"),
        ([b"unknown"], None),
        ([b"198.51.100.7, "], None),
        ([], None),
    ],
)
def test_the_client_a_proxy_names(values: list[bytes], client: str | None) -> None:
    assert forwarded_for([(b"x-forwarded-for", v) for v in values]) == client


def _gate(**settings: Any) -> tuple[SecurityGate, list[Principal]]:
    return noting_gate(SecuritySettings(**settings), Authenticator(None, None))


def _status_of(gate: SecurityGate, method: str, path: str, client: str, headers: dict[str, str]) -> int:
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": (client, 5000)}  # fmt: skip
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    asyncio.run(gate(scope, receive, send))
    return statuses[0]


def test_only_a_trusted_proxy_names_the_client() -> None:
    gate, _ = _gate(auth=False, ban_after_failures=2, trusted_proxies=[ipaddress.ip_network("10.0.0.5/32")])
    for _ in range(2):
        assert _status_of(gate, "GET", "/.env", "10.0.0.5", {"X-Forwarded-For": "203.0.113.1"}) == 404
    assert _status_of(gate, "GET", "/v2", "10.0.0.5", {"X-Forwarded-For": "203.0.113.1"}) == 403
    assert _status_of(gate, "GET", "/v2", "10.0.0.5", {"X-Forwarded-For": "203.0.113.2"}) == 200
    assert _status_of(gate, "GET", "/v2", "10.0.0.5", {}) == 200
    for _ in range(2):  # an untrusted peer's X-Forwarded-For is its own business: it is counted itself
        assert _status_of(gate, "GET", "/.env", "10.0.0.6", {"X-Forwarded-For": "203.0.113.3"}) == 404
    assert _status_of(gate, "GET", "/v2", "10.0.0.6", {"X-Forwarded-For": "203.0.113.4"}) == 403


def test_an_auth_off_gate_narrows_to_a_forwarded_principal_and_never_widens() -> None:
    gate, seen = _gate(auth=False)
    narrow = Principal("key:ab12cd34", "user", ("digits",), "acme")
    head = {"X-Edgegen-Principal": narrow.to_header().decode()}
    assert _status_of(gate, "POST", "/predict", "10.0.0.5", head) == 200
    assert seen[-1] == narrow
    assert _status_of(gate, "GET", "/admin/models", "10.0.0.5", head) == 403
    assert _status_of(gate, "POST", "/predict", "10.0.0.5", {"X-Edgegen-Principal": "{"}) == 400
    assert _status_of(gate, "POST", "/predict", "10.0.0.5", {}) == 200
    assert seen[-1].role == "admin"


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        (b"127.0.0.1:8000", True),
        (b"[::1]:8000", True),
        (b"localhost", True),
        (b"LOCALHOST:80", True),
        (b"api.localhost", True),
        (b"192.0.2.10:8000", True),  # an address: no name a rebinding attacker could own
        (b"edge.example.com", True),  # named in allowed_hosts
        (b"evil.example", False),
        (b"127.0.0.1.evil.example", False),
        (b"127.0.0.1:1/v2/health/live", False),
        (b"", False),
    ],
)
def test_the_hosts_a_server_answers_to(host: bytes, ok: bool) -> None:
    origin = SameOrigin(["edge.example.com"])
    assert origin.host_ok(host) is ok
    assert origin.host_ok(host) is ok  # the verdict remembered
    for n in range(1100):  # more Hosts than are remembered: the verdicts start over, still right
        assert origin.host_ok(b"evil%d.example" % n) is False
    assert origin.host_ok(host) is ok


@pytest.mark.parametrize(
    ("method", "headers", "proxied", "refused"),
    [
        ("POST", {"host": "127.0.0.1:8000"}, False, False),  # curl, the CLI, the gateway: no Origin
        ("POST", {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}, False, False),
        ("POST", {"host": "gw.example", "origin": "https://gw.example"}, False, True),  # not a name of ours
        ("POST", {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:9000"}, False, True),
        ("POST", {"host": "127.0.0.1:8000", "origin": "null"}, False, True),
        ("GET", {"host": "127.0.0.1:8000", "origin": "https://evil.example"}, False, False),  # reads nothing
        ("GET", {"host": "evil.example"}, False, True),  # DNS rebinding reads too
        ("POST", {"host": "10.0.0.5:8000", "origin": "https://edge.example.com"}, False, True),
        (
            "POST",
            {
                "host": "10.0.0.5:8000",
                "origin": "https://edge.example.com",
                "x-forwarded-host": "edge.example.com",
            },
            True,
            False,
        ),
        (
            "POST",
            {
                "host": "10.0.0.5:8000",
                "origin": "https://evil.example",
                "x-forwarded-host": "edge.example.com",
            },
            True,
            True,
        ),
        (  # only a trusted proxy names the origin the client reached
            "POST",
            {"host": "10.0.0.5:8000", "origin": "https://evil.example", "x-forwarded-host": "evil.example"},
            False,
            True,
        ),
    ],
)
def test_a_request_from_a_browser_elsewhere(
    method: str, headers: dict[str, str], proxied: bool, refused: bool
) -> None:
    pairs = [(k.encode(), v.encode()) for k, v in headers.items()]
    why = SameOrigin([]).refusal(method, pairs, proxied=proxied)
    assert (why is not None) is refused, why


def test_the_public_view_sums_over_models_and_drops_the_interpreter() -> None:
    registry = CollectorRegistry()
    requests = Counter("requests", "Requests.", ["route", "model"], registry=registry)
    latency = Histogram("latency_seconds", "Latency.", ["model"], buckets=(0.1, 1.0), registry=registry)
    usage = Gauge("kv_usage_ratio", "Share in use.", ["model"], registry=registry)
    PlatformCollector(registry=registry)
    for model, share in (("digits", 0.25), ("tiny-llm", 0.75)):
        requests.labels("/predict", model).inc(2)
        latency.labels(model).observe(0.5)
        usage.labels(model).set(share)
    text = generate_latest(PublicView(registry, model_names=False)).decode()
    assert "python_info" not in text
    assert "digits" not in text
    assert "tiny-llm" not in text
    assert 'requests_total{route="/predict"} 4.0' in text
    assert 'latency_seconds_bucket{le="1.0"} 2.0' in text
    assert "latency_seconds_count 2.0" in text
    assert "kv_usage_ratio 0.75" in text  # a ratio is not a sum: the largest
    named = generate_latest(PublicView(registry, model_names=True)).decode()
    assert 'requests_total{model="digits",route="/predict"} 2.0' in named
    assert "python_info" not in named


def test_the_compose_fleet_sets_what_its_trust_needs() -> None:
    compose = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "compose.yaml").read_text())
    node = compose["x-node-env"]
    security = SecuritySettings(
        trusted_proxies=json.loads(node["EDGEGEN_SECURITY__TRUSTED_PROXIES"]),
        allowed_hosts=json.loads(node["EDGEGEN_SECURITY__ALLOWED_HOSTS"]),
    )
    gateway = compose["services"]["gateway"]["environment"]
    assert ipaddress.ip_address("172.18.0.5") in security.trusted_proxies[1]  # Docker's networks
    assert set(security.allowed_hosts) == {n for n in compose["services"] if n != "gateway"}
    assert json.loads(gateway["EDGEGEN_GATEWAY_SECURITY__ALLOWED_HOSTS"]) == ["gateway"]
    assert SameOrigin(security.allowed_hosts).refusal("POST", [(b"host", b"node2:8000")]) is None
