"""JWT verification: the configured algorithm only, every time claim checked, admin tokens used once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from edgegen.security.tokens import InvalidToken, JwtSettings, JwtVerifier

SECRET = "s" * 40


def admin() -> dict[str, Any]:
    return {"role": "admin", "aud": "edgegen", "exp": time.time() + 3600}


def hs256(**claims: Any) -> str:
    body = {"sub": "alice", "role": "user", "aud": "edgegen", "exp": time.time() + 60, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b64(hmac.new(key, signing.encode(), hashlib.sha256).digest()) if key else ""
    return f"{signing}.{signature}"


@pytest.fixture
def verifier() -> JwtVerifier:
    return JwtVerifier(JwtSettings(secret=SECRET, issuer=None))


def test_a_good_token_gives_its_claims(verifier: JwtVerifier) -> None:
    claims = verifier.verify(hs256(models=["digits"], tenant="acme", jti="t1"))
    assert (claims.subject, claims.role, claims.models, claims.tenant, claims.token_id) == (
        "alice", "user", ("digits",), "acme", "t1"
    )  # fmt: skip


# Tokens are made when the test runs (not at collection): a suite that takes minutes must not see them expire.
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: hs256(exp=time.time() - 3600), "expired"),
        (lambda: hs256(nbf=time.time() + 3600), "not valid yet"),
        (lambda: hs256(aud="someone-else"), "wrong audience"),
        (lambda: hs256(exp=None), "required claim"),
        (lambda: hs256(role="root"), "role claim"),
        (lambda: hs256(models="digits"), "models claim"),
        (lambda: hs256(tenant=7), "tenant claim"),
        (lambda: jwt.encode(admin(), "x" * 40, algorithm="HS256"), "bad signature"),
        (lambda: forged({"alg": "none", "typ": "JWT"}, admin(), None), "algorithm not allowed"),
        (lambda: "not.a.token", "malformed"),
        (lambda: "", "malformed"),
    ],
)
def test_bad_tokens_are_refused_with_the_reason(
    verifier: JwtVerifier, make: Callable[[], str], reason: str
) -> None:
    token = make()
    with pytest.raises(InvalidToken, match=reason) as caught:
        verifier.verify(token)
    assert token[-10:] not in caught.value.message or not token


def test_an_admin_token_works_once(verifier: JwtVerifier) -> None:
    token = hs256(role="admin", jti="once")
    assert verifier.verify(token, admin=True).role == "admin"
    with pytest.raises(InvalidToken, match="already used"):
        verifier.verify(token, admin=True)
    assert verifier.verify(token).role == "admin"  # replay protection is for admin calls
    with pytest.raises(InvalidToken, match="needs a jti"):
        verifier.verify(hs256(role="admin"), admin=True)


def test_spent_admin_ids_are_forgotten_once_their_tokens_expire() -> None:
    now = [time.time()]
    verifier = JwtVerifier(JwtSettings(secret=SECRET, leeway_s=0), clock=lambda: now[0])
    verifier.verify(hs256(role="admin", jti="a", exp=now[0] + 5), admin=True)
    now[0] += 10
    verifier.verify(hs256(role="admin", jti="b"), admin=True)
    assert verifier._spent.execute("SELECT jti FROM spent").fetchall() == [("b",)]


def test_an_admin_token_is_spent_for_every_worker_of_the_server_and_after_a_restart(tmp_path: Path) -> None:
    """Each worker process of `--workers N` has a verifier of its own: an admin token one of them took is
    refused by the others (a captured token replayed over fresh connections lands on any of them), and by
    the server's next process. Before, each verifier kept its spent ids in its own memory: the token
    worked once per worker, and again after each restart."""
    spent = tmp_path / "security" / "spent_tokens.sqlite"
    workers = [JwtVerifier(JwtSettings(secret=SECRET, issuer=None), spent_file=spent) for _ in range(2)]
    token = hs256(role="admin", jti="once")
    assert workers[0].verify(token, admin=True).role == "admin"
    with pytest.raises(InvalidToken, match="already used"):
        workers[1].verify(token, admin=True)
    restarted = JwtVerifier(JwtSettings(secret=SECRET, issuer=None), spent_file=spent)
    with pytest.raises(InvalidToken, match="already used"):
        restarted.verify(token, admin=True)
    assert workers[1].verify(hs256(role="admin", jti="another"), admin=True).role == "admin"


def test_eddsa_tokens_and_the_key_confusion_attack(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "issuer.pem").write_bytes(public_pem)
    verifier = JwtVerifier(JwtSettings(algorithm="EdDSA", public_key_file=tmp_path / "issuer.pem"))
    claims = {"sub": "bob", "role": "operator", "aud": "edgegen", "exp": time.time() + 60}
    assert verifier.verify(jwt.encode(claims, private, algorithm="EdDSA")).role == "operator"
    # HS256 "signed" with the public key as the HMAC secret: valid HMAC, wrong algorithm.
    confused = forged({"alg": "HS256", "typ": "JWT"}, {**claims, "role": "admin"}, public_pem)
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        verifier.verify(confused)


@pytest.mark.parametrize(
    "settings",
    [{"algorithm": "HS256"}, {"secret": "short"}, {"algorithm": "EdDSA", "secret": SECRET}],
)
def test_bad_jwt_settings(settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JwtSettings(**settings)
