"""The security gate: one pure-ASGI middleware in front of a node's or a gateway's routes.

In order, for every HTTP request (cheap refusals first, so a flood costs little):
1. the client's network must be allowed and not denied (403);
2. a client the intrusion guard banned is refused until its ban ends (403, Retry-After);
3. the client address's token bucket (429, Retry-After);
4. a path that looks like scanning (`../`, `%2e%2e`, `/.env`, NUL …) counts against the client (404);
5. the credential (`Authorization: Bearer …`: an API key or a JWT) unless the path is public — or,
   over mutual TLS, the caller a gateway certificate vouches for (`X-Edgegen-Principal`), or a node's
   own certificate shipping its logs (`POST /gateway/logs`, nothing else: a node needs no key for
   it); a missing or bad one is 401 and counts against the client;
6. the role the path needs (decided on the raw and the decoded path), and over mutual TLS the
   client certificate's role for admin paths (403);
7. the credential's token bucket (429) and its concurrent generations (429).
The principal lands in `scope["edgegen.principal"]` for the routes' model and tenant checks. Bans,
failed credentials and every admin call that changes something (log batches are data, not changes) go
to the audit log.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgegen.node.errors import error_body, is_openai
from edgegen.security.audit import AuditLog
from edgegen.security.auth import (
    ANONYMOUS_ADMIN,
    GENERATION_PATHS,
    Authenticator,
    Principal,
    required_role,
)
from edgegen.security.guard import SCAN_PATTERNS, IntrusionGuard
from edgegen.security.ratelimit import RateLimiter
from edgegen.security.settings import SecuritySettings
from edgegen.security.tokens import InvalidToken

log = logging.getLogger("edgegen.security")
_OU = re.compile(r"(?:^|,)OU=([^,+]+)")
_CN = re.compile(r"(?:^|,)CN=([^,+]+)")
SHIP_PATH = "/gateway/logs"  # where nodes ship their logs (gateway/app.py)
# Which client-certificate roles may make admin calls over mutual TLS, by the role the path needs.
ADMIN_PEERS = {
    "operator": frozenset({"gateway", "operator", "admin"}),
    "admin": frozenset({"gateway", "admin"}),
}
Refusal = tuple[int, str, dict[str, str]]


def peer_role(scope: Scope) -> str | None:
    """The role in the client certificate of a mutual-TLS connection (its subject's OU), or None."""
    return _peer(scope, _OU)


def peer_name(scope: Scope) -> str | None:
    """The common name in the client certificate of a mutual-TLS connection, or None."""
    return _peer(scope, _CN)


def _peer(scope: Scope, part: re.Pattern[str]) -> str | None:
    tls = scope.get("extensions", {}).get("tls")
    name = tls.get("client_cert_name") if tls else None
    match = part.search(name) if name else None
    return match.group(1) if match else None


def bearer(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, bytes | None]:
    """The bearer token and the `X-Edgegen-Principal` header of a request, either None if absent."""
    token = vouched = None
    for key, value in headers:
        if key == b"authorization":
            scheme, _, rest = value.partition(b" ")
            # A header that is not a bearer token is refused like a bad one.
            token = rest.strip().decode("latin-1") if scheme.lower() == b"bearer" and rest.strip() else ""
        elif key == b"x-edgegen-principal":
            vouched = value
    return token, vouched


class SecurityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.refusals = Counter(
            "edgegen_security_refusals_total",
            "Requests the security gate refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.bans = Counter(
            "edgegen_security_bans_total", "Clients banned by the intrusion guard.", registry=registry
        )
        self._children: dict[str, Any] = {}

    def refused(self, reason: str) -> None:
        child = self._children.get(reason)
        if child is None:
            child = self._children[reason] = self.refusals.labels(reason)
        child.inc()


class SecurityGate:
    def __init__(
        self,
        app: ASGIApp,
        settings: SecuritySettings,
        authenticator: Authenticator,
        audit: AuditLog | None,
        metrics: SecurityMetrics,
        *,
        mutual_tls: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app, self.settings, self.authn, self.audit = app, settings, authenticator, audit
        self.metrics, self.mutual_tls, self.clock = metrics, mutual_tls, clock
        s = settings
        self.per_key = RateLimiter(s.rate_per_key, s.burst_per_key)
        self.per_client = RateLimiter(s.rate_per_client, s.burst_per_client)
        self.guard = IntrusionGuard(s.ban_after_failures, s.ban_window_s, s.ban_s)
        self.streams: dict[str, int] = {}
        self._networks: dict[str, bool] = {}  # address → allowed, decided once
        self._roles: dict[tuple[str, bytes, str], str | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else ""
        outcome = self._check(scope, client, self.clock())
        if not isinstance(outcome, Principal):
            status, message, headers = outcome
            await _refuse(send, status, message, headers, is_openai(scope["path"]))
            return
        scope["edgegen.principal"] = outcome
        generation = scope["path"] in GENERATION_PATHS
        admin_change = (
            scope["method"] not in ("GET", "HEAD")
            and self._role(scope) in ("operator", "admin")
            and scope["path"] != SHIP_PATH
        )
        if generation:
            self.streams[outcome.subject] = self.streams.get(outcome.subject, 0) + 1
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status if admin_change else send)
        finally:
            if generation:
                left = self.streams[outcome.subject] - 1
                if left:
                    self.streams[outcome.subject] = left
                else:
                    del self.streams[outcome.subject]
            if admin_change and self.audit is not None:
                self.audit.record(
                    outcome.subject, f"{scope['method']} {scope['path']}", scope["path"],
                    "ok" if status < 400 else f"refused {status}", {"client": client},
                )  # fmt: skip

    def _check(self, scope: Scope, client: str, now: float) -> Principal | Refusal:
        s = self.settings
        if not self._network_allowed(client):
            return self._refusal("network", 403, "this client's network is not allowed")
        banned = self.guard.banned_for(client, now)
        if banned > 0:
            return self._refusal("banned", 403, "this client is banned for a while", banned)
        wait = self.per_client.take(client, now)
        if wait > 0:
            return self._refusal("rate_limited", 429, "too many requests from this address", wait)
        path: str = scope["path"]
        raw: bytes = scope.get("raw_path") or path.encode()
        query: bytes = scope.get("query_string", b"")
        if SCAN_PATTERNS.search(raw.decode("latin-1")) or (
            query and SCAN_PATTERNS.search(query.decode("latin-1"))
        ):
            self._failed(client, now, "probe", raw)
            return self._refusal("probe", 404, "not found")
        role = self._role(scope)
        if role is None:
            return ANONYMOUS_ADMIN if not s.auth else Principal("anonymous", "user", models=())
        shipper = self._node_shipping(scope, raw)
        if shipper is not None:
            return shipper
        principal = self._authenticate(scope, client, now, admin=role != "user")
        if not isinstance(principal, Principal):
            return principal
        if not principal.at_least(role):
            return self._refusal("forbidden", 403, f"this credential's role may not call {path}")
        if self.mutual_tls and role != "user" and peer_role(scope) not in ADMIN_PEERS[role]:
            return self._refusal("forbidden", 403, "admin calls need a client certificate of an admin role")
        wait = self.per_key.take(principal.subject, now)
        if wait > 0:
            return self._refusal("rate_limited", 429, "too many requests for this credential", wait)
        if path in GENERATION_PATHS and self.streams.get(principal.subject, 0) >= s.max_streams_per_key:
            return self._refusal(
                "streams", 429, f"this credential already runs {s.max_streams_per_key} generations", 1.0
            )
        return principal

    def _node_shipping(self, scope: Scope, raw: bytes) -> Principal | None:
        """A node shipping its logs with its own certificate (role node, over mutual TLS): an operator
        for `POST /gateway/logs` alone, named `node:<its CN>` (the route keeps it to its own lines)."""
        if not (self.mutual_tls and scope["method"] == "POST" and raw == SHIP_PATH.encode()):
            return None
        if scope["path"] != SHIP_PATH or peer_role(scope) != "node":
            return None
        name = peer_name(scope)
        return Principal(f"node:{name}", "operator", models=()) if name else None

    def _role(self, scope: Scope) -> str | None:
        """The role this request needs; remembered per (method, raw path, path), most requests repeat."""
        key = (scope["method"], scope.get("raw_path") or b"", scope["path"])
        if key not in self._roles:
            if len(self._roles) > 10_000:
                self._roles.clear()
            self._roles[key] = required_role(key[0], key[1] or key[2].encode(), key[2])
        return self._roles[key]

    def _authenticate(self, scope: Scope, client: str, now: float, admin: bool) -> Principal | Refusal:
        if not self.settings.auth:
            return ANONYMOUS_ADMIN
        token, vouched = bearer(scope["headers"])
        if vouched is not None and self.mutual_tls and peer_role(scope) == "gateway":
            principal = Principal.from_header(vouched)
            if principal is not None:
                return principal
        if token is None:
            self._failed(client, now, "no credential", scope.get("raw_path", b""))
            return self._refusal(
                "unauthenticated", 401, "this route needs a credential: Authorization: Bearer <key or token>",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        try:
            return self.authn.authenticate(token, admin=admin)
        except InvalidToken as exc:
            self._failed(client, now, exc.message, scope.get("raw_path", b""))
            return self._refusal(
                "unauthenticated",
                401,
                exc.message,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    def _failed(self, client: str, now: float, why: str, raw_path: bytes) -> None:
        """A failed credential or a probe: counted against the client, which a burst of them bans."""
        where = raw_path.decode("latin-1")[:200]
        if self.audit is not None and why != "no credential":
            self.audit.record(client, "auth.failure", where, why)
        if self.guard.failure(client, now):
            self.metrics.bans.inc()
            ban = self.guard.banned_for(client, now)
            log.warning("client banned", extra={"client": client, "seconds": round(ban), "reason": why})
            if self.audit is not None:
                self.audit.record(client, "client.banned", where, why, {"seconds": round(ban)})

    def _refusal(
        self,
        reason: str,
        status: int,
        message: str,
        retry_after: float = 0.0,
        headers: dict[str, str] | None = None,
    ) -> Refusal:
        self.metrics.refused(reason)
        out = dict(headers or {})
        if retry_after > 0:
            out["Retry-After"] = str(max(1, math.ceil(retry_after)))
        log.info("request refused", extra={"status": status, "reason": message})
        return status, message, out

    def _network_allowed(self, client: str) -> bool:
        allowed = self._networks.get(client)
        if allowed is None:
            s = self.settings
            try:
                address = ipaddress.ip_address(client)
            except ValueError:
                allowed = not s.allow_networks  # a Unix socket or a test client: no address to match
            else:
                allowed = (not s.allow_networks or any(address in n for n in s.allow_networks)) and not any(
                    address in n for n in s.deny_networks
                )
            if len(self._networks) > 100_000:
                self._networks.clear()
            self._networks[client] = allowed
        return allowed


async def _refuse(send: Send, status: int, message: str, headers: dict[str, str], openai: bool) -> None:
    body = error_body(message, status, openai)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def build_gate(
    app: ASGIApp,
    settings: SecuritySettings,
    keys_file: Path,
    home: Path,
    registry: CollectorRegistry,
    *,
    mutual_tls: bool,
) -> SecurityGate:
    """The gate with its key store, JWT verifier and audit log opened from the settings."""
    from edgegen.security.keys import KeyStore
    from edgegen.security.tokens import JwtVerifier

    jwt = JwtVerifier(settings.jwt) if settings.jwt is not None else None
    authn = Authenticator(KeyStore(keys_file) if settings.auth else None, jwt)
    audit = AuditLog(settings.audit_file or home / "security" / "audit.sqlite")
    return SecurityGate(app, settings, authn, audit, SecurityMetrics(registry), mutual_tls=mutual_tls)
