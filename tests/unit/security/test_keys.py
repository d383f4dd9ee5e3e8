"""API keys: shown once, stored hashed, checked in constant time, scoped, revocable."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgegen.errors import ConfigError
from edgegen.security.auth import Authenticator
from edgegen.security.keys import KeyStore


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "security" / "keys.sqlite")


def test_a_key_verifies_to_what_it_grants(store: KeyStore) -> None:
    token, key = store.create("user", models=("digits",), tenant="acme", label="ci")
    assert token.startswith(f"eg_{key.id}_")
    found = store.verify(token)
    assert found == key
    assert (found.role, found.models, found.tenant, found.label) == ("user", ("digits",), "acme", "ci")
    # What a request carrying it may do (the gate's view of the key)
    principal = Authenticator(store, None).authenticate(token)
    assert principal.allows_model("digits")
    assert not principal.allows_model("smollm2-135m")
    assert not principal.at_least("operator")
    admin_token, admin = store.create("admin")
    assert admin.models is None
    admin_principal = Authenticator(store, None).authenticate(admin_token)
    assert admin_principal.allows_model("anything")
    assert admin_principal.at_least("operator")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # one character of the secret
        lambda t: "eg_00000000_" + t.split("_", 2)[2],  # another id
        lambda t: t + "x",
        lambda t: t.upper(),
        lambda t: "",
        lambda t: "Bearer " + t,
        lambda t: t.replace("eg_", "eg-"),
    ],
)
def test_anything_but_the_token_is_refused(store: KeyStore, mangle: Callable[[str], str]) -> None:
    token, _ = store.create("user")
    assert store.verify(mangle(token)) is None


def test_the_secret_is_not_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    store = KeyStore(path)
    token, _ = store.create("admin")
    store.close()
    secret = token.split("_", 2)[2]
    assert secret.encode() not in path.read_bytes()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_revoked_key_is_refused_at_once(store: KeyStore) -> None:
    token, key = store.create("operator")
    assert store.revoke(key.id).id == key.id
    assert store.verify(token) is None
    assert store.get(key.id).revoked is not None  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="already revoked"):
        store.revoke(key.id)
    with pytest.raises(ConfigError, match="no key"):
        store.revoke("deadbeef")


@pytest.mark.parametrize(
    ("role", "models", "tenant", "message"),
    [
        ("root", None, None, "role must be one of"),
        ("user", ("../etc",), None, "not a valid"),
        ("user", (), None, "at least one model"),
        ("user", None, "a b", "not a valid"),
    ],
)
def test_bad_key_requests(
    store: KeyStore, role: str, models: tuple[str, ...] | None, tenant: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        store.create(role, models=models, tenant=tenant)


def test_keys_list_in_creation_order(store: KeyStore) -> None:
    ids = [store.create(role)[1].id for role in ("user", "operator", "admin")]
    assert [key.id for key in store.list()] == ids


def test_the_cli_prints_the_key_alone_on_stdout(tmp_path: Path) -> None:
    env = {**os.environ, "EDGEGEN_HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "edgegen", "keys", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    created = run("create", "--role", "operator", "--models", "digits,tiny", "--tenant", "acme")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert created.stdout == token + "\n"
    key = KeyStore(tmp_path / "security" / "keys.sqlite").verify(token)
    assert key is not None
    assert (key.role, key.models, key.tenant) == ("operator", ("digits", "tiny"), "acme")
    listed = run("list")
    assert key.id in listed.stdout
    assert token.split("_", 2)[2] not in listed.stdout + listed.stderr
    assert run("revoke", key.id).returncode == 0
    assert "revoked" in run("list").stdout
    refused = run("create", "--role", "root")
    assert refused.returncode == 1
    assert "role must be one of" in refused.stderr
    assert "Traceback" not in refused.stderr
