"""JWT bearer tokens, verified the strict way (PyJWT underneath).

    verifier = JwtVerifier(JwtSettings(algorithm="HS256", secret="…", audience="edgegen", issuer="idp"))
    claims = verifier.verify(token, admin=True)     # raises InvalidToken with the reason

- The algorithm is configured, not read from the token: `alg: none`, and an HS256 token signed with
  an EdDSA public key as its HMAC secret (key confusion), are refused because they are not the one
  algorithm allowed.
- `exp` is required; `exp`, `nbf` and `iat` are checked with a small leeway; `aud` and `iss` must
  match when configured.
- An admin call must carry a `jti` never seen before (until that token expires): a captured admin
  token cannot be replayed — on any worker process of the server, nor after a restart, when the spent
  ids are kept in a file (`spent_file`, beside the key store; in memory otherwise).
- The grant travels in claims: `role` (user | operator | admin), optional `models` (list) and
  `tenant`; `sub` names the caller in the audit log.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from edgegen.db import connect, transaction
from edgegen.errors import EdgegenError
from edgegen.security.keys import ROLES


class InvalidToken(EdgegenError):
    """A bearer token that does not authenticate anyone; the message says why (never the token)."""


class JwtSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    algorithm: Literal["HS256", "EdDSA"] = "HS256"
    # A secret by type: shown as stars wherever settings are shown (security/secrets.py).
    secret: SecretStr | None = Field(None, min_length=32, description="HS256: the shared secret (≥ 32 chars)")
    public_key_file: Path | None = Field(None, description="EdDSA: the issuer's Ed25519 public key, PEM")
    audience: str | None = "edgegen"
    issuer: str | None = None
    leeway_s: float = Field(30.0, ge=0, le=600)

    @model_validator(mode="after")
    def _key(self) -> JwtSettings:
        if self.algorithm == "HS256" and (self.secret is None or self.public_key_file is not None):
            raise ValueError("HS256 takes a secret and no public_key_file")
        if self.algorithm == "EdDSA" and (self.public_key_file is None or self.secret is not None):
            raise ValueError("EdDSA takes a public_key_file and no secret")
        return self


@dataclass(frozen=True)
class Claims:
    subject: str
    role: str
    models: tuple[str, ...] | None
    tenant: str | None
    token_id: str | None
    expires: float


class JwtVerifier:
    def __init__(
        self, settings: JwtSettings, clock: Callable[[], float] = time.time, spent_file: Path | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._key: Any = (
            settings.secret.get_secret_value()  # type: ignore[union-attr]
            if settings.algorithm == "HS256"
            else settings.public_key_file.read_bytes()  # type: ignore[union-attr]
        )
        # The jti of each admin token already used, until it expires: shared by the worker processes of
        # one server, and kept across its restarts, through `spent_file`.
        self._spent = (
            connect(spent_file)
            if spent_file is not None
            else sqlite3.connect(":memory:", isolation_level=None)
        )
        self._spent.execute("CREATE TABLE IF NOT EXISTS spent (jti TEXT PRIMARY KEY, expires REAL NOT NULL)")

    def verify(self, token: str, *, admin: bool = False) -> Claims:
        s = self.settings
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[s.algorithm],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
                options={"require": ["exp"], "verify_aud": s.audience is not None},
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"invalid token: {_reason(exc)}") from None
        role = payload.get("role")
        if role not in ROLES:
            raise InvalidToken("invalid token: its role claim is not one of " + ", ".join(ROLES))
        models = payload.get("models")
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
            raise InvalidToken("invalid token: its models claim is not a list of names")
        tenant = payload.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise InvalidToken("invalid token: its tenant claim is not a string")
        claims = Claims(
            subject=str(payload.get("sub", "")),
            role=role,
            models=tuple(models) if models is not None else None,
            tenant=tenant,
            token_id=payload.get("jti") if isinstance(payload.get("jti"), str) else None,
            expires=float(payload["exp"]),
        )
        if admin:
            self._spend(claims)
        return claims

    def _spend(self, claims: Claims) -> None:
        """An admin token works once: its jti is remembered until it expires."""
        if claims.token_id is None:
            raise InvalidToken("invalid token: an admin call needs a jti claim")
        with transaction(self._spent) as db:
            db.execute("DELETE FROM spent WHERE expires < ?", (self.clock() - self.settings.leeway_s,))
            try:
                db.execute(
                    "INSERT INTO spent (jti, expires) VALUES (?, ?)", (claims.token_id, claims.expires)
                )
            except sqlite3.IntegrityError:
                raise InvalidToken("invalid token: this admin token was already used") from None


def _reason(exc: jwt.InvalidTokenError) -> str:
    reasons: list[tuple[type[Exception], str]] = [
        (jwt.ExpiredSignatureError, "expired"),
        (jwt.ImmatureSignatureError, "not valid yet"),
        (jwt.InvalidAudienceError, "wrong audience"),
        (jwt.InvalidIssuerError, "wrong issuer"),
        (jwt.MissingRequiredClaimError, "a required claim is missing"),
        (jwt.InvalidAlgorithmError, "algorithm not allowed"),
        (jwt.InvalidSignatureError, "bad signature"),
    ]
    return next((text for cls, text in reasons if isinstance(exc, cls)), "malformed")
