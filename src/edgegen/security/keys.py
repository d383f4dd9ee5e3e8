"""API keys: created once and shown once, stored hashed, checked in constant time, revocable.

A key reads `eg_<id>_<secret>`: the id (8 hex digits) finds the record, the secret (32 random bytes,
base64url) proves possession. Only SHA-256(secret) is stored — a secret of 256 random bits needs no slow
hash, as GitHub's and Stripe's tokens do not — and the comparison is `hmac.compare_digest`. Records live
in SQLite (`EDGEGEN_HOME/security/keys.sqlite`, mode 0600):

    >>> store = KeyStore(Path("keys.sqlite"))                              # doctest: +SKIP
    >>> token, key = store.create("user", models=("digits",), tenant="acme")  # doctest: +SKIP
    >>> store.verify(token).role                                            # doctest: +SKIP
    'user'

Roles (DESIGN.md): `admin` (everything), `operator` (models, config, restart), `user` (inference, own jobs).
A key may be limited to some models and belongs to at most one tenant.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from edgegen.errors import ConfigError

Role = Literal["user", "operator", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
_TOKEN = re.compile(r"^eg_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    digest BLOB NOT NULL,
    role TEXT NOT NULL,
    models TEXT,            -- comma-separated model names; NULL: every model
    tenant TEXT,
    label TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    revoked REAL            -- when it was revoked; NULL: valid
)
"""


@dataclass(frozen=True)
class ApiKey:
    """What a key grants (never its secret)."""

    id: str
    role: Role
    models: tuple[str, ...] | None  # None: every model
    tenant: str | None
    label: str
    created: float
    revoked: float | None = None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if fresh:
            os.chmod(path, 0o600)  # hashes only, but nobody else's business
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def create(
        self,
        role: str,
        *,
        models: tuple[str, ...] | None = None,
        tenant: str | None = None,
        label: str = "",
    ) -> tuple[str, ApiKey]:
        """A new key: the token (to show once) and its record."""
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        for name in (*(models or ()), *((tenant,) if tenant else ())):
            if not _NAME.match(name):
                raise ConfigError(f"{name!r} is not a valid model or tenant name (letters, digits, . _ -)")
        if models is not None and not models:
            raise ConfigError("a key limited to models needs at least one model")
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        while True:
            key_id = secrets.token_hex(4)
            try:
                self._db.execute(
                    "INSERT INTO keys (id, digest, role, models, tenant, label, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key_id, _digest(secret), role, ",".join(models) if models else None, tenant, label,
                     time.time()),
                )  # fmt: skip
                break
            except sqlite3.IntegrityError:
                continue  # an id already taken (1 in 4 billion): draw again
        key = self.get(key_id)
        assert key is not None
        return f"eg_{key_id}_{secret}", key

    def get(self, key_id: str) -> ApiKey | None:
        row = self._db.execute(
            "SELECT id, role, models, tenant, label, created, revoked FROM keys WHERE id = ?", (key_id,)
        ).fetchone()
        if row is None:
            return None
        return ApiKey(
            row[0], row[1], tuple(row[2].split(",")) if row[2] else None, row[3], row[4], row[5], row[6]
        )

    def verify(self, token: str) -> ApiKey | None:
        """The key a token stands for, or None: malformed, unknown, wrong secret or revoked."""
        match = _TOKEN.match(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        row = self._db.execute("SELECT digest, revoked FROM keys WHERE id = ?", (key_id,)).fetchone()
        # Compare even for an unknown id, so the answer takes as long either way.
        stored = row[0] if row is not None else b"\0" * 32
        if not hmac.compare_digest(stored, _digest(secret)) or row is None or row[1] is not None:
            return None
        return self.get(key_id)

    def revoke(self, key_id: str) -> ApiKey:
        updated = self._db.execute(
            "UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id)
        ).rowcount
        key = self.get(key_id)
        if key is None:
            raise ConfigError(f"no key with id {key_id!r}")
        if not updated:
            raise ConfigError(f"key {key_id} was already revoked")
        return key

    def list(self) -> list[ApiKey]:
        ids = [row[0] for row in self._db.execute("SELECT id FROM keys ORDER BY created")]
        return [key for key in map(self.get, ids) if key is not None]
