"""A fleet set up as production would be: a node behind HTTPS that wants client certificates of the
fleet's CA for admin calls, signed models only, API keys and JWTs; a gateway that calls the node over
mutual TLS. Everything is made by the project's own tools (`Pki`, `KeyStore`, `Signer`)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest

from edgegen.executors import describe_model
from edgegen.security.keys import KeyStore
from edgegen.security.pki import Pki
from edgegen.security.signing import Signer
from edgegen.store import ModelStore
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import GatewayProcess, NodeProcess, running
from tests.llm_models import write_tiny_llama

JWT_SECRET = "s" * 48
JWT_AUDIENCE = "edgegen"


@dataclass
class Fleet:
    home: Path
    pki: Path
    keys: dict[str, str] = field(default_factory=dict)  # role or label → API key

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def admin_client(self, cert: str = "ops", key: str = "admin") -> httpx.Client:
        """A client making admin calls as an operator would: an admin key and a client certificate."""
        return httpx.Client(verify=self.client_tls(cert), headers=self.headers(key), timeout=30)

    def client_tls(self, cert: str | None = None, ca: Path | None = None) -> ssl.SSLContext:
        """What a client of the node uses: our CA, and a client certificate when named."""
        context = ssl.create_default_context(cafile=str(ca or self.pki / "ca.crt"))
        if cert is not None:
            context.load_cert_chain(self.pki / f"{cert}.crt", self.pki / f"{cert}.key")
        return context


def error_of(response: httpx.Response) -> str:
    """The message of an error answer, in either of the node's shapes."""
    body = response.json()["error"]
    return str(body["message"] if isinstance(body, dict) else body)


def make_jwt(role: str = "user", lifetime: float = 300, **claims: object) -> str:
    """An HS256 token the fleet accepts, made now (tokens made at collection time would expire)."""
    now = time.time()
    payload = {"sub": "alice", "role": role, "aud": JWT_AUDIENCE, "exp": now + lifetime, "iat": now, **claims}
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def security_env(fleet: Fleet, prefix: str = "EDGEGEN_") -> dict[str, str]:
    return {
        f"{prefix}SECURITY__JWT__SECRET": JWT_SECRET,
        f"{prefix}SECURITY__KEYS_FILE": str(fleet.home / "security" / "keys.sqlite"),
    }


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Fleet:
    home = tmp_path_factory.mktemp("secure")
    store = ModelStore(home / "models", signer=Signer.local(home), describe=describe_model)
    store.add(model_files["onnx"], "digits")
    store.add(model_files["onnx"], "digits", activate=False)  # version 2, for activation tests
    store.add(write_tiny_llama(home / "tiny.gguf"), "tiny-llm", task="text-generation")
    pki = Pki(home / "pki")
    pki.init()
    pki.issue("node1", "node")
    pki.issue("gw", "gateway")
    pki.issue("ops", "client", role="admin")
    pki.issue("alice", "client", role="user")
    pki.issue("revoked", "client", role="admin")
    pki.revoke("revoked")
    other = Pki(home / "other-ca")
    other.init("another CA")
    other.issue("ops", "client", role="admin")
    keys = KeyStore(home / "security" / "keys.sqlite")
    made = Fleet(home, home / "pki")
    for label, role, models, tenant in [
        ("admin", "admin", None, None),
        ("operator", "operator", None, None),
        ("user", "user", None, "acme"),
        ("digits-only", "user", ("digits",), "acme"),
        ("llm-only", "user", ("tiny-llm",), "beta"),
        ("revoked", "user", None, None),
    ]:
        made.keys[label] = keys.create(role, models=models, tenant=tenant, label=label)[0]
    keys.revoke(made.keys["revoked"].split("_")[1])
    keys.close()
    return made


def node_env(fleet: Fleet, **extra: str) -> dict[str, str]:
    pki = fleet.pki
    return {
        **LLM_ENV,
        **security_env(fleet),
        "EDGEGEN_TLS__CERT_FILE": str(pki / "node1.crt"),
        "EDGEGEN_TLS__KEY_FILE": str(pki / "node1.key"),
        "EDGEGEN_TLS__CLIENT_CA_FILE": str(pki / "ca.crt"),
        "EDGEGEN_TLS__CLIENT_CERTS": "optional",  # users call without one; admin calls need one
        "EDGEGEN_TLS__CRL_FILE": str(pki / "crl.pem"),
        "EDGEGEN_SECURITY__BAN_AFTER_FAILURES": "100000",  # this suite fails on purpose, a lot
        "EDGEGEN_SECURITY__HEADER_TIMEOUT_S": "2",
        "EDGEGEN_SECURITY__BODY_TIMEOUT_S": "2",
        "EDGEGEN_STORE_POLL_S": "0",
        **extra,
    }


class SecureNode(NodeProcess):
    """A node on HTTPS; clients (and the readiness probe) check it against the fleet's CA."""

    scheme = "https"

    def __init__(self, fleet: Fleet, **extra: str) -> None:
        super().__init__(fleet.home, env=node_env(fleet, **extra), auth=True)
        self.fleet = fleet
        self.verify = fleet.client_tls()


@pytest.fixture(scope="module")
def node(fleet: Fleet) -> Iterator[SecureNode]:
    with running(SecureNode(fleet)) as process:
        yield process


@pytest.fixture(scope="module")
def gateway(fleet: Fleet, node: SecureNode) -> Iterator[GatewayProcess]:
    config = fleet.home / f"gateway-{node.port}.toml"
    pki = fleet.pki
    config.write_text(
        f'[[nodes]]\nurl = "https://127.0.0.1:{node.port}"\nname = "node1"\n'
        f'[nodes_tls]\nca_file = "{pki / "ca.crt"}"\n'
        f'cert_file = "{pki / "gw.crt"}"\nkey_file = "{pki / "gw.key"}"\n'
        "[health]\ninterval_s = 0.5\n"
    )
    env = {
        **security_env(fleet, "EDGEGEN_GATEWAY_"),
        "EDGEGEN_GATEWAY_SECURITY__BAN_AFTER_FAILURES": "100000",
    }
    with running(GatewayProcess(fleet.home, "--config", str(config), env=env, auth=True)) as process:
        yield process
