"""Who is calling and what they may do: credentials → a Principal, paths → the role they need.

    authn = Authenticator(KeyStore(path), JwtVerifier(jwt_settings))
    principal = authn.authenticate(token, admin=False)   # raises InvalidToken
    required_role("POST", b"/admin/models/digits/activate", "/admin/models/digits/activate")  # 'operator'

A token that reads `eg_…` is an API key, anything else a JWT. Verified API keys are remembered for
`cache_s` seconds (a key lookup is a SQLite read; a revocation takes effect within that time), JWTs
for as long as they are valid, up to `cache_s` — except on admin calls, which always verify and spend
their `jti`.

The role a request needs is decided on its raw path *and* on its canonical path (security/paths.py:
decoded once; the gate refuses any path with another possible reading), the stricter one winning, for
every method: `/admin%2Fmodels` cannot pass as a user route and then be routed to an admin one.
Health and metrics are public for GET and HEAD only.

A queued job keeps its submitter (`Principal.to_record`) and runs as `current_principal` finds it then: an
API key as its record reads at that moment, so narrowing or revoking a key reaches the jobs it queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from edgegen.errors import Forbidden
from edgegen.security.keys import ROLES, ApiKey, KeyStore, Role
from edgegen.security.tokens import InvalidToken, JwtVerifier

# The dashboard's page, script and style hold no data (the page fetches it with the operator's key).
PUBLIC_PATHS = frozenset(
    {
        b"/v2/health/live",
        b"/v2/health/ready",
        b"/metrics",
        b"/dashboard",
        b"/dashboard/app.js",
        b"/dashboard/app.css",
    }
)
ADMIN_PREFIXES = (b"/admin/", b"/gateway/")
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: `subject` names it in logs and the audit log, never its secret."""

    subject: str
    role: Role
    models: tuple[str, ...] | None = None  # None: every model
    tenant: str | None = None
    # The id of this node's API key that authenticated the caller, so a queued job can look it up again;
    # None for any other credential (a JWT, a gateway's word — whose keys are not this node's — or none).
    key_id: str | None = None

    @property
    def owner(self) -> str:
        """Whose jobs and cached answers this caller's are: its tenant, else the credential alone."""
        return self.tenant or self.subject

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def to_header(self) -> bytes:
        """What a gateway tells a node over mutual TLS about the caller it authenticated."""
        return orjson.dumps(
            {"sub": self.subject, "role": self.role, "models": self.models, "tenant": self.tenant}
        )

    @classmethod
    def from_header(cls, value: bytes) -> Principal | None:
        """The caller a gateway vouches for; never one of this node's keys, whatever its subject reads."""
        return cls._parse(value, keep_key=False)

    def to_record(self) -> bytes:
        """What a queued job keeps of its submitter: the header's fields and the key id, if any."""
        return orjson.dumps(
            {"sub": self.subject, "role": self.role, "models": self.models, "tenant": self.tenant,
             "key": self.key_id}
        )  # fmt: skip

    @classmethod
    def from_record(cls, value: bytes) -> Principal | None:
        """A queued job's submitter as `to_record` wrote it; None for anything else."""
        return cls._parse(value, keep_key=True)

    @classmethod
    def _parse(cls, value: bytes, keep_key: bool) -> Principal | None:
        try:
            data = orjson.loads(value)
            models, key_id = data["models"], data.get("key") if keep_key else None
            principal = cls(
                subject=str(data["sub"]),
                role=data["role"],
                models=tuple(str(m) for m in models) if models is not None else None,
                tenant=str(data["tenant"]) if data["tenant"] is not None else None,
                key_id=str(key_id) if key_id is not None else None,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None
        return principal if principal.role in ROLES else None


ANONYMOUS_ADMIN = Principal("anonymous", "admin")  # every caller, when authentication is switched off


def principal_of(scope: Mapping[str, Any]) -> Principal:
    """The caller the security gate let in; a request that did not pass the gate has none (refused)."""
    principal = scope.get("edgegen.principal")
    if principal is None:
        raise Forbidden("no credential was checked for this request")
    return principal  # type: ignore[no-any-return]


def _key_principal(key: ApiKey) -> Principal:
    """The caller an API key of this node's key store stands for."""
    return Principal(f"key:{key.id}", key.role, key.models, key.tenant, key.id)


def current_principal(stored: Principal, keys: KeyStore | None) -> Principal | None:
    """`stored` as its credential reads now. An API key of this node's is looked up again by its id (its
    secret is never kept): its role, models and tenant as they are now, or None once it is revoked or
    gone, or when no key store is open (authentication is off). Any other credential — a JWT, a gateway's
    word, nobody when authentication is off — has nothing here to be looked up in: the scope it was
    checked with stands.

    >>> current_principal(Principal("jwt:ann", "user", ("digits",)), None).models
    ('digits',)
    >>> current_principal(Principal("key:ab12cd34", "user", key_id="ab12cd34"), None) is None
    True
    """
    if stored.key_id is None:
        return stored
    key = keys.get(stored.key_id) if keys is not None else None
    if key is None or key.revoked is not None:
        return None
    return _key_principal(key)


def _role_for(path: bytes, method: str) -> Role | None:
    if path in PUBLIC_PATHS and method in ("GET", "HEAD"):
        return None
    if path == b"/gateway/logs":
        return "operator"  # nodes ship their logs with an operator key; reading them is an operator's too
    if path == b"/admin" or path == b"/gateway" or path.startswith(ADMIN_PREFIXES):
        # Reading the fleet is an operator's business; changing it, an admin's.
        changes = (b"/gateway/", b"/admin/keys", b"/admin/audit", b"/admin/software")
        if path.startswith(changes) and method not in ("GET", "HEAD"):
            return "admin"
        return "operator"
    return "user"


def required_role(method: str, raw_path: bytes, path: str) -> Role | None:
    """The least role that may call `method` on this path (None: anyone), the stricter of the raw
    path and `path`, its canonical reading (`canonical_path(raw_path)`: what the node routes).

    >>> required_role("GET", b"/admin%2Fmodels", "/admin/models")
    'operator'
    >>> required_role("POST", b"/metrics", "/metrics") is None
    False
    """
    decoded = path.encode("utf-8", "surrogateescape")
    roles = (_role_for(raw_path, method), _role_for(decoded, method))
    return max(roles, key=lambda role: -1 if role is None else ROLES.index(role))


class Authenticator:
    def __init__(
        self,
        keys: KeyStore | None,
        jwt: JwtVerifier | None,
        cache_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_cached: int = 10_000,
    ) -> None:
        self.keys, self.jwt, self.cache_s, self.clock = keys, jwt, cache_s, clock
        self.max_cached = max_cached
        self._cache: dict[str, tuple[Principal, float]] = {}

    def authenticate(self, token: str, *, admin: bool = False) -> Principal:
        now = self.clock()
        if not admin:
            hit = self._cache.get(token)
            if hit is not None and hit[1] > now:
                return hit[0]
        if token.startswith("eg_"):
            principal, until = self._api_key(token), now + self.cache_s
        else:
            principal, until = self._jwt(token, admin, now)
        if len(self._cache) >= self.max_cached:
            self._cache.clear()  # a flood of distinct valid tokens: start over rather than grow
        self._cache[token] = (principal, until)
        return principal

    def _api_key(self, token: str) -> Principal:
        key = self.keys.verify(token) if self.keys is not None else None
        if key is None:
            raise InvalidToken("invalid API key")
        return _key_principal(key)

    def _jwt(self, token: str, admin: bool, now: float) -> tuple[Principal, float]:
        if self.jwt is None:
            raise InvalidToken("invalid API key")  # JWTs are not accepted here: say no more than that
        claims = self.jwt.verify(token, admin=admin)
        principal = Principal(f"jwt:{claims.subject}", claims.role, claims.models, claims.tenant)  # type: ignore[arg-type]
        left = claims.expires - self.jwt.clock()
        return principal, now + min(self.cache_s, max(0.0, left))
