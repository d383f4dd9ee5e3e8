"""The configuration routes as a red team sees them (issue 14, items 1 and 5).

1. No route answers a secret, to any caller: the JWT secret, an API key for log shipping, a Redis
   password, an encryption key, the gateway's key for its nodes, the contents of a TLS private key.
   (An operator who read the JWT secret from `GET /admin/config` could forge an admin token.)
5. A remote change (`PATCH /admin/config`, fanned out by `PATCH /gateway/config`) cannot brick a node:
   paths, hosts and secrets are changed on the node itself only, sizes and deadlines are bounded, the
   whole would-be settings are validated before anything is written, and a node whose newest remote
   file is bad starts from the last good one. Config routes never answer 500 or an internal path.

A node with its own home (the fleet's store, keys and CA) and a gateway in front of it, over mutual TLS.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from edgegen.config import LogsSettings, Settings
from edgegen.gateway.settings import NodeEntry
from edgegen.security.atrest import new_key
from edgegen.security.secrets import shown
from edgegen.security.settings import SecuritySettings
from edgegen.security.signing import local_key_paths
from tests.e2e.node_process import GatewayProcess, NodeProcess, free_port, running
from tests.security.conftest import JWT_SECRET, Fleet, error_of, make_jwt, node_env, security_env

MASK = "**********"
LOGS_KEY = "logs-key-" + "L" * 40
REDIS_PASSWORD = "redis-password-" + "R" * 24
ENCRYPTION_KEY = new_key()
NODES_KEY = "nodes-key-" + "N" * 40
SAMPLE = {"input_data": [0.0] * 64}


def pem_body(path: Path) -> str:
    """The longest base64 line of a PEM file: what a leak of the private key would show."""
    return max((line for line in path.read_text().splitlines() if "-----" not in line), key=len)


def secrets(fleet: Fleet) -> dict[str, str]:
    """Every secret the node and gateway below are configured with, by what it is."""
    return {
        "JWT secret": JWT_SECRET,
        "log shipping key": LOGS_KEY,
        "Redis password": REDIS_PASSWORD,
        "encryption key": ENCRYPTION_KEY,
        "gateway's nodes key": NODES_KEY,
        "node's TLS private key": pem_body(fleet.pki / "node1.key"),
        "gateway's TLS private key": pem_body(fleet.pki / "gw.key"),
    }


class SeamNode(NodeProcess):
    """A node on HTTPS with a home of its own (its remote changes touch no other test's node), the
    fleet's store, keys and CA, and every kind of secret a node holds."""

    scheme = "https"

    def __init__(self, fleet: Fleet, home: Path, port: int | None = None) -> None:
        env = node_env(
            fleet,
            EDGEGEN_SECURITY__AUTH="true",
            EDGEGEN_STORE=str(fleet.home / "models"),
            EDGEGEN_SECURITY__TRUSTED_SIGNERS=json.dumps([str(local_key_paths(fleet.home)[1])]),
            EDGEGEN_LOGS__KEY=LOGS_KEY,
            EDGEGEN_JOBS__REDIS_URL=f"redis://edgegen:{REDIS_PASSWORD}@127.0.0.1:6390/0",
            EDGEGEN_ENCRYPTION_KEYS=f"k1:{ENCRYPTION_KEY}",
        )
        super().__init__(home, env=env, port=port)
        self.fleet = fleet
        self.verify = fleet.client_tls()

    def client(self, who: str = "operator") -> httpx.Client:
        """A caller with the fleet's admin-role certificate and the API key of `who`."""
        return self.fleet.admin_client(key=who)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seams")


@pytest.fixture(scope="module")
def seam(fleet: Fleet, home: Path) -> Iterator[SeamNode]:
    with running(SeamNode(fleet, home)) as process:
        yield process


@pytest.fixture(scope="module")
def front(fleet: Fleet, seam: SeamNode, home: Path) -> Iterator[GatewayProcess]:
    """A gateway over mutual TLS to the node (`seam`) and to one that never answers (`gone`)."""
    pki = fleet.pki
    config = home / "gateway.toml"
    config.write_text(
        f'[[nodes]]\nurl = "https://127.0.0.1:{seam.port}"\nname = "seam"\n'
        f'[[nodes]]\nurl = "https://127.0.0.1:{free_port()}"\nname = "gone"\n'
        f'[nodes_tls]\nca_file = "{pki / "ca.crt"}"\n'
        f'cert_file = "{pki / "gw.crt"}"\nkey_file = "{pki / "gw.key"}"\n'
        "[health]\ninterval_s = 0.5\nstatus_interval_s = 0.5\n"
    )
    env = {
        **security_env(fleet, "EDGEGEN_GATEWAY_"),
        "EDGEGEN_GATEWAY_NODES_KEY": NODES_KEY,
        "EDGEGEN_GATEWAY_SECURITY__BAN_AFTER_FAILURES": "100000",
    }
    (home / "gateway").mkdir()
    with running(GatewayProcess(home / "gateway", "--config", str(config), env=env)) as process:
        yield process


def remote_file(node: NodeProcess) -> Path:
    return node.home / "config" / "remote.toml"


# -- 1. secrets ---------------------------------------------------------------------------------------------
NODE_ROUTES = [
    *("/admin/config", "/admin/status", "/admin/models", "/admin/software", "/admin/audit"),
    *("/openapi.json", "/metrics", "/v2", "/v1/models"),
]
GATEWAY_ROUTES = [
    *("/gateway/config/seam", "/gateway/fleet", "/gateway/nodes", "/gateway/fleet/history"),
    *("/gateway/alerts", "/gateway/logs", "/metrics", "/v2/health/ready", "/openapi.json"),
]


@pytest.mark.parametrize("who", ["operator", "admin"])
@pytest.mark.parametrize("path", NODE_ROUTES)
def test_no_node_route_answers_a_secret(seam: SeamNode, fleet: Fleet, path: str, who: str) -> None:
    with seam.client(who) as client:
        response = client.get(f"{seam.url}{path}")
    assert response.status_code == 200, response.text
    for what, secret in secrets(fleet).items():
        assert secret not in response.text, f"{path} shows the {what} to an {who}"


@pytest.mark.parametrize("path", GATEWAY_ROUTES)
def test_no_gateway_route_answers_a_secret(front: GatewayProcess, fleet: Fleet, path: str) -> None:
    response = httpx.get(f"{front.url}{path}", headers=fleet.headers("operator"), timeout=30)
    assert response.status_code < 500, response.text
    for what, secret in secrets(fleet).items():
        assert secret not in response.text, f"{path} shows the {what}"


def test_the_settings_show_every_secret_as_stars_and_the_jwt_still_verifies(
    seam: SeamNode, front: GatewayProcess, fleet: Fleet
) -> None:
    """The leak of issue 14: an operator read `security.jwt.secret` and forged an admin token."""
    with seam.client() as client:
        settings = client.get(f"{seam.url}/admin/config").json()["settings"]
    assert settings["security"]["jwt"]["secret"] == MASK
    assert settings["logs"]["key"] == MASK
    assert settings["jobs"]["redis_url"] == f"redis://{MASK}@127.0.0.1:6390/0"  # where, but not who
    through = httpx.get(f"{front.url}/gateway/config/seam", headers=fleet.headers("operator"), timeout=30)
    assert through.json()["settings"] == settings
    # The verifier still holds the real secret: a token signed with it works, on the node and the gateway.
    bearer = {"Authorization": f"Bearer {make_jwt()}"}
    assert (
        httpx.post(f"{seam.url}/predict", json=SAMPLE, headers=bearer, verify=seam.verify).status_code == 200
    )
    assert httpx.post(f"{front.url}/predict", json=SAMPLE, headers=bearer).status_code == 200


def test_settings_never_print_a_secret_and_keep_it_for_who_needs_it() -> None:
    redis = f"redis://edgegen:{REDIS_PASSWORD}@cache:6379/0"
    settings = Settings(
        security={"jwt": {"secret": JWT_SECRET}}, logs={"key": LOGS_KEY}, jobs={"redis_url": redis}
    )
    for text in (repr(settings), str(settings), json.dumps(shown(settings)), settings.model_dump_json()):
        for secret in (JWT_SECRET, LOGS_KEY, REDIS_PASSWORD):
            assert secret not in text
    assert settings.jobs.redis_url.get_secret_value() == redis  # what the job queue connects with
    assert shown(settings)["jobs"]["redis_url"] == f"redis://{MASK}@cache:6379/0"


@pytest.mark.parametrize(
    "make",
    [
        lambda: NodeEntry(url="https://gw:hunter2@127.0.0.1:8001"),
        lambda: LogsSettings(ship_to="https://node:hunter2@gw:8080"),
        lambda: SecuritySettings(model_sources=["https://u:hunter2@models.example/"]),
    ],
    ids=["gateway-node-url", "logs-ship-to", "model-source"],
)
def test_a_url_with_a_password_is_refused_where_it_would_be_shown(make: Callable[[], object]) -> None:
    """A node's URL is in the fleet view, a shipping or model source URL in GET /admin/config: their
    credentials have settings of their own (nodes_tls or nodes_key, logs.key), typed as secrets."""
    with pytest.raises(ValidationError, match="user name or password"):
        make()


def test_no_secret_reaches_the_logs(seam: SeamNode, front: GatewayProcess, fleet: Fleet) -> None:
    with seam.client() as client:
        client.get(f"{seam.url}/admin/config")
    httpx.get(f"{front.url}/gateway/config/seam", headers=fleet.headers("operator"), timeout=30)
    logs = seam.log() + front.log()
    for what, secret in secrets(fleet).items():
        assert secret not in logs, f"the logs show the {what}"


# -- 5. remote changes ---------------------------------------------------------------------------------------
def refused_changes(fleet: Fleet) -> list[tuple[str, Any]]:
    return [
        ("cache.path", str(fleet.home / "security" / "keys.sqlite")),  # onto the key store
        ("jobs.path", "/tmp/elsewhere/jobs.sqlite"),
        ("jobs.redis_url", "redis://attacker.example:6379/0"),
        ("logs.key", "x" * 40),
        ("max_body_bytes", 1e15),
        ("max_header_bytes", 1e12),
        ("cache.memory_bytes", 1e15),
        ("cache.disk_bytes", 10**30),
        ("request_timeout_s", math.inf),
        ("llm.timeout_s", math.nan),
        ("llm.kv_budget_mb", 1e12),  # beyond any machine's memory
        ("llm.kv_budget_mb", -1),
        ("llm.kv_type", "q2_k"),  # a type llama.cpp may not read a cache in
        ("jobs.lease_s", 1e300),
        ("default_model", 'digits"\n[security]\nauth = false\n'),
        ("models.digits.max_queue_size", 10**12),
    ]


def test_a_refused_change_is_a_4xx_naming_the_setting_and_nothing_is_written(
    seam: SeamNode, fleet: Fleet
) -> None:
    with seam.client() as client:
        assert (
            client.patch(f"{seam.url}/admin/config", json={"changes": {"cache.ttl_s": 120}}).status_code
            == 200
        )
        before = remote_file(seam).read_bytes()
        for key, value in refused_changes(fleet):
            # (json.dumps writes inf and nan as Infinity and NaN, which a JSON parser in Python reads)
            body = json.dumps({"changes": {key: value}})
            answer = client.patch(
                f"{seam.url}/admin/config", content=body, headers={"content-type": "application/json"}
            )
            assert answer.status_code in (400, 403, 422), (key, answer.status_code, answer.text)
            assert key in error_of(answer), (key, answer.text)
            assert str(seam.home) not in answer.text
            assert remote_file(seam).read_bytes() == before, key
        config = client.get(f"{seam.url}/admin/config")
    assert config.status_code == 200
    assert config.json()["remote"] == {"cache": {"ttl_s": 120.0}}
    assert config.json()["settings"]["request_timeout_s"] == 30.0
    assert seam.alive()


def test_the_gateway_answers_a_nodes_refusal_as_that_4xx_and_an_unreachable_node_as_502(
    front: GatewayProcess, fleet: Fleet, seam: SeamNode
) -> None:
    operator = fleet.headers("operator")
    for changes, status in [({"cache.path": "/tmp/x.sqlite"}, 403), ({"max_body_bytes": 10**15}, 400)]:
        answer = httpx.patch(
            f"{front.url}/gateway/config", json={"changes": changes, "nodes": ["seam"]}, headers=operator
        )
        assert answer.status_code == status, answer.text
        assert "seam" in error_of(answer)
        assert next(iter(changes)) in error_of(answer)
    gone = httpx.get(f"{front.url}/gateway/config/gone", headers=operator, timeout=30)
    assert gone.status_code == 502, gone.text
    change = {"changes": {"cache.ttl_s": 5}, "nodes": ["gone"]}
    assert httpx.patch(f"{front.url}/gateway/config", json=change, headers=operator).status_code == 502


def test_a_bad_remote_file_leaves_config_routes_answering_without_a_path(seam: SeamNode) -> None:
    with seam.client() as client:
        assert (
            client.patch(f"{seam.url}/admin/config", json={"changes": {"cache.ttl_s": 90}}).status_code == 200
        )
        remote_file(seam).write_text("cache = [unclosed\n")  # a disk, or a hand, spoilt it
        config = client.get(f"{seam.url}/admin/config")
        assert config.status_code == 200, config.text
        problems = config.json()["remote_problems"]  # what is wrong, named by file, not by path
        assert problems
        assert "remote.toml" in problems[0]
        assert str(seam.home) not in json.dumps(problems)
        again = client.patch(f"{seam.url}/admin/config", json={"changes": {"cache.ttl_s": 91}})
        assert again.status_code == 200, again.text
    assert tomllib.loads(remote_file(seam).read_text())["cache"]["ttl_s"] == 91.0


def test_a_remote_file_is_escaped_whatever_the_strings(tmp_path: Path, fleet: Fleet) -> None:
    """A value with quotes, newlines and control characters is written as TOML that reads back the same
    (the node starts again), or refused; never a file that stops the node."""
    node = SeamNode(fleet, tmp_path)
    with running(node), node.client() as client:
        for value in ('digits"\n[security]\nauth = false\n', "a\tb\x00c\\d", "ünïcode"):
            answer = client.patch(f"{node.url}/admin/config", json={"changes": {"default_model": value}})
            assert answer.status_code in (200, 400), answer.text
        assert (
            client.patch(f"{node.url}/admin/config", json={"changes": {"cache.ttl_s": 7}}).status_code == 200
        )
    with running(SeamNode(fleet, tmp_path, port=node.port)), node.client() as client:
        settings = client.get(f"{node.url}/admin/config").json()["settings"]
    assert settings["cache"]["ttl_s"] == 7.0
    assert settings["security"]["auth"] is True


def test_a_node_starts_from_the_last_good_remote_file_and_says_so(tmp_path: Path, fleet: Fleet) -> None:
    first = SeamNode(fleet, tmp_path)
    with running(first), first.client() as client:
        for ttl in (60, 61):  # the second change keeps the first file as the last good one
            assert (
                client.patch(f"{first.url}/admin/config", json={"changes": {"cache.ttl_s": ttl}}).status_code
                == 200
            )
    remote = remote_file(first)
    remote.write_text("request_timeout_s = inf\n")  # valid TOML, not a valid setting

    second = SeamNode(fleet, tmp_path)
    with running(second, expected=("remote.toml",)), second.client() as client:
        config = client.get(f"{second.url}/admin/config").json()
    assert config["settings"]["cache"]["ttl_s"] == 60.0
    assert config["settings"]["request_timeout_s"] == 30.0
    assert "remote.toml" in second.log()
    assert "last good" in second.log()

    remote.with_name("remote.toml.last-good").write_text("cache = [unclosed\n")
    third = SeamNode(fleet, tmp_path)
    with running(third, expected=("remote.toml",)), third.client() as client:
        config = client.get(f"{third.url}/admin/config").json()
    assert config["settings"]["cache"]["ttl_s"] == 3600.0
    assert "without remote changes" in third.log()
