"""The security gate: one pure-ASGI middleware in front of a node's or a gateway's routes.

Who a request counts against (the *client*) is the connecting peer — or, when the peer is a trusted
proxy (`security.trusted_proxies`, loopback by default, or a gateway certificate over mutual TLS), the
address its `X-Forwarded-For` names last (our gateway sets it). A proxy stands for all of its clients, so
it is never counted or banned itself; neither is a client in `security.never_ban` (loopback by default,
fail2ban's ignoreip).

In order, for every HTTP request (cheap refusals first, so a flood costs little):
1. the peer's network must be allowed and not denied (403);
2. a client the intrusion guard banned is refused until its ban ends (403, Retry-After);
3. the client's token bucket (429, Retry-After);
4. a path that is not canonical (a dot segment, an encoded slash, `//` …: security/paths.py) is 400,
   one that looks like scanning (`/.env`, `/wp-login.php` …, raw or decoded) 404; both count against
   the client;
5. the credential (`Authorization: Bearer …`: an API key or a JWT) unless the path is public — or,
   over mutual TLS, the caller a gateway certificate vouches for (`X-Edgegen-Principal`), or a node's
   own certificate shipping its logs (`POST /gateway/logs`, nothing else: a node needs no key for
   it); a missing or bad one is 401 and counts against the client. With authentication off every
   caller is an admin, narrowed to the caller a gateway forwards (`X-Edgegen-Principal`): whoever
   reaches such a server is an admin anyway, so a narrower principal widens nothing, and the gateway's
   callers keep their model scopes and tenants behind it. `/metrics` is public unless
   `security.metrics_auth = "key"`; a scrape that shows a credential is checked, and an operator's
   sees more (observe/metrics.py);
6. the role the path needs (decided on the raw and the canonical path), over mutual TLS the client
   certificate's role for admin paths, and the model a path names (`/models/{name}/…`, `/v2/models/
   {name}…`) among the credential's (403) — at a gateway, before any node sees the request;
7. an admin change — and any request where no credential stands behind the caller (authentication
   off) — only under a `Host` that is this server's and, if it changes something, from no other
   `Origin` (security/origin.py: DNS rebinding, cross-site requests; 403);
8. the credential's token bucket (429) and its concurrent generations (429).
The principal lands in `scope["edgegen.principal"]` for the routes' model and tenant checks, the path's
one reading in `scope["edgegen.path"]` for a gateway's relay (gateway/target.py). Bans,
failed credentials and every admin call that changes something (log batches are data, not changes) go
to the audit log.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgegen.errors import InvalidInput, error_body, is_openai
from edgegen.memo import Memo
from edgegen.security.audit import AuditLog
from edgegen.security.auth import (
    ANONYMOUS_ADMIN,
    GENERATION_PATHS,
    Authenticator,
    Principal,
    required_role,
)
from edgegen.security.guard import IntrusionGuard, looks_like_scanning
from edgegen.security.origin import SAFE_METHODS, SameOrigin
from edgegen.security.paths import canonical_path, raw_path_of
from edgegen.security.ratelimit import RateLimiter
from edgegen.security.settings import Network, SecuritySettings
from edgegen.security.tokens import InvalidToken

log = logging.getLogger("edgegen.security")
_OU = re.compile(r"(?:^|,)OU=([^,+]+)")
_CN = re.compile(r"(?:^|,)CN=([^,+]+)")
SHIP_PATH = "/gateway/logs"  # where nodes ship their logs (gateway/routes/logs.py)
METRICS_PATH = "/metrics"
# What is remembered of the paths seen, per raw path: at most this many, each at most this long (a flood
# of long paths, each new, would otherwise hold 10,000 heads' worth of memory).
_REMEMBERED_PATHS, _REMEMBERED_PATH_BYTES = 10_000, 512
# `/v2/models/stats` names no model: it answers the statistics of those the credential may use.
_MODEL_IN_PATH = re.compile(r"^/(?:v2/models/(?!stats$)|models/)([^/]+)(?:/|$)")
PUBLIC = Principal("anonymous", "user", models=())  # the caller of a public path, with no credential
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


def forwarded_for(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The client a proxy names: the last address of the last `X-Forwarded-For` (the one the nearest
    proxy, our gateway, appended; earlier ones are whatever the client claimed), or None when there is
    none or it is not an address.

    >>> forwarded_for([(b"x-forwarded-for", b"6.6.6.6, 198.51.100.7")])
    '198.51.100.7'
    """
    last = None
    for key, value in headers:
        if key == b"x-forwarded-for":
            last = value
    if last is None:
        return None
    try:
        return str(ipaddress.ip_address(last.rsplit(b",", 1)[-1].strip().decode("latin-1")))
    except ValueError:
        return None


@dataclass(frozen=True)
class Caller:
    """Who a request counts against (`address`), the peer that sent it, whether it is spared from bans
    and whether that peer is a trusted proxy."""

    address: str
    peer: str
    spared: bool = False
    proxied: bool = False


class Networks:
    """Membership of addresses in a list of networks, remembered per address (bounded)."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._seen: Memo[str, bool] = Memo(100_000)

    def __contains__(self, address: str) -> bool:
        known = self._seen.get(address)
        if known is None:
            try:
                parsed = ipaddress.ip_address(address)
            except ValueError:  # a Unix socket or a test client: no address to match
                known = False
            else:
                known = any(parsed in network for network in self.networks)
            self._seen.remember(address, known)
        return known


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
        self.trusted_proxies, self.never_ban = Networks(s.trusted_proxies), Networks(s.never_ban)
        self.same_origin = SameOrigin(s.allowed_hosts)
        self._networks: dict[str, bool] = {}  # address → allowed, decided once
        self._roles: Memo[tuple[str, bytes], str | None] = Memo(_REMEMBERED_PATHS)
        self._readings: Memo[bytes, tuple[str | None, str, bool]] = Memo(_REMEMBERED_PATHS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = self._caller(scope)
        scope["edgegen.client"] = client.address  # what a gateway forwards as X-Forwarded-For
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
        recorded = False

        def record(status: int) -> None:
            nonlocal recorded
            if admin_change and self.audit is not None and not recorded:
                recorded = True
                self.audit.record(
                    outcome.subject, f"{scope['method']} {scope['path']}", scope["path"],
                    "ok" if status < 400 else f"refused {status}", _where(client),
                )  # fmt: skip

        async def send_recorded(message: Message) -> None:
            if message["type"] == "http.response.start":  # in the log before the caller hears of it
                record(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_recorded if admin_change else send)
        finally:
            if generation:
                left = self.streams[outcome.subject] - 1
                if left:
                    self.streams[outcome.subject] = left
                else:
                    del self.streams[outcome.subject]
            record(500)  # (an app that failed before it answered)

    def _caller(self, scope: Scope) -> Caller:
        peer = scope["client"][0] if scope.get("client") else ""
        proxied = peer in self.trusted_proxies or (self.mutual_tls and peer_role(scope) == "gateway")
        named = forwarded_for(scope["headers"]) if proxied else None
        if named is None:  # the peer's own request: a proxy's (health checks, admin calls) is spared
            return Caller(peer, peer, spared=proxied or peer in self.never_ban, proxied=proxied)
        return Caller(named, peer, spared=named in self.never_ban, proxied=True)

    def _check(self, scope: Scope, client: Caller, now: float) -> Principal | Refusal:
        s = self.settings
        if not self._network_allowed(client.peer):
            return self._refusal("network", 403, "this client's network is not allowed")
        banned = 0.0 if client.spared else self.guard.banned_for(client.address, now)
        if banned > 0:
            return self._refusal("banned", 403, "this client is banned for a while", banned)
        wait = self.per_client.take(client.address, now)
        if wait > 0:
            return self._refusal("rate_limited", 429, "too many requests from this address", wait)
        raw = raw_path_of(scope)
        path, invalid, scanning = self._reading(raw)
        if path is None:
            self._failed(client, now, "probe", raw)
            return self._refusal("probe", 400, invalid)
        scope["edgegen.path"] = path  # the reading a gateway relays (gateway/target.py)
        query: bytes = scope.get("query_string", b"")
        if scanning or (query and looks_like_scanning(raw, path, query)):
            self._failed(client, now, "probe", raw)
            return self._refusal("probe", 404, "not found")
        role = self._role(scope)
        if role is None and path == METRICS_PATH and s.metrics_auth == "key":
            role = "operator"
        if role is None:
            return self._public(scope, client, now, path)
        shipper = self._node_shipping(scope, raw)
        if shipper is not None:
            return shipper
        principal = self._authenticate(scope, client, now, admin=role != "user")
        if not isinstance(principal, Principal):
            return principal
        if not principal.at_least(role):
            return self._refusal("forbidden", 403, f"this credential's role may not call {path}")
        # (a scrape reads figures: it needs a key when the operator says so, not an admin's certificate)
        admin_call = role != "user" and path != METRICS_PATH
        if self.mutual_tls and admin_call and peer_role(scope) not in ADMIN_PEERS[role]:
            return self._refusal("forbidden", 403, "admin calls need a client certificate of an admin role")
        model = _MODEL_IN_PATH.match(path)
        if model is not None and not principal.allows_model(model.group(1)):
            return self._refusal("forbidden", 403, f"this credential may not use model {model.group(1)!r}")
        # A browser elsewhere could be the caller of an admin change, and of anything where no credential
        # stands behind the caller (authentication off): DNS rebinding, cross-site requests.
        if (admin_call and scope["method"] not in SAFE_METHODS) or principal is ANONYMOUS_ADMIN:
            why = self.same_origin.refusal(scope["method"], scope["headers"], proxied=client.proxied)
            if why is not None:
                return self._refusal("cross_site", 403, why)
        wait = self.per_key.take(principal.subject, now)
        if wait > 0:
            return self._refusal("rate_limited", 429, "too many requests for this credential", wait)
        if path in GENERATION_PATHS and self.streams.get(principal.subject, 0) >= s.max_streams_per_key:
            return self._refusal(
                "streams", 429, f"this credential already runs {s.max_streams_per_key} generations", 1.0
            )
        return principal

    def _reading(self, raw: bytes) -> tuple[str | None, str, bool]:
        """The one reading of a raw path that the role, the scan check and (at a gateway) the node all
        use: (its canonical path, or None and why it has none; whether the path looks like scanning).
        Remembered per raw path (bounded; a long path is read each time): most requests repeat."""
        known = self._readings.get(raw)
        if known is None:
            try:
                path = canonical_path(raw)
            except InvalidInput as exc:
                known = (None, exc.message, False)
            else:
                known = (path, "", looks_like_scanning(raw, path, b""))
            if len(raw) <= _REMEMBERED_PATH_BYTES:
                self._readings.remember(raw, known)
        return known

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
        """The role this request needs, on its raw and its canonical path (`_check` refused any other);
        remembered per (method, raw path), most requests repeat."""
        method, raw = scope["method"], raw_path_of(scope)
        key = (method, raw)
        if key in self._roles:
            return self._roles[key]
        role = required_role(method, raw, canonical_path(raw))
        if len(raw) <= _REMEMBERED_PATH_BYTES:
            self._roles.remember(key, role)
        return role

    def _public(self, scope: Scope, client: Caller, now: float, path: str) -> Principal | Refusal:
        """The caller of a public path: nobody in particular, unless a scrape of /metrics shows a
        credential, which then decides how much it sees. With authentication off, an admin."""
        if not self.settings.auth:
            return ANONYMOUS_ADMIN
        if path == METRICS_PATH and bearer(scope["headers"])[0] is not None:
            return self._authenticate(scope, client, now, admin=False)
        return PUBLIC

    def _authenticate(self, scope: Scope, client: Caller, now: float, admin: bool) -> Principal | Refusal:
        token, vouched = bearer(scope["headers"])
        if not self.settings.auth:
            return self._forwarded(vouched)
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

    def _forwarded(self, vouched: bytes | None) -> Principal | Refusal:
        """With authentication off: an admin, or the narrower caller a gateway forwards."""
        if vouched is None:
            return ANONYMOUS_ADMIN
        principal = Principal.from_header(vouched)
        if principal is None:
            return self._refusal("bad_principal", 400, "X-Edgegen-Principal is not a principal")
        return principal

    def _failed(self, client: Caller, now: float, why: str, raw_path: bytes) -> None:
        """A failed credential or a probe: counted against the client, which a burst of them bans —
        unless it is spared (a proxy, which speaks for many, or a `never_ban` network)."""
        where = raw_path.decode("latin-1")[:200]
        if self.audit is not None and why != "no credential":
            self.audit.record(client.address, "auth.failure", where, why, _where(client))
        if client.spared or not self.guard.failure(client.address, now):
            return
        self.metrics.bans.inc()
        ban = self.guard.banned_for(client.address, now)
        log.warning("client banned", extra={"client": client.address, "seconds": round(ban), "reason": why})
        if self.audit is not None:
            self.audit.record(
                client.address, "client.banned", where, why, {"seconds": round(ban), **_where(client)}
            )

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


def _where(client: Caller) -> dict[str, str]:
    """What the audit log keeps of where a request came from."""
    if client.address == client.peer:
        return {"client": client.address}
    return {"client": client.address, "via": client.peer}


async def _refuse(send: Send, status: int, message: str, headers: dict[str, str], openai: bool) -> None:
    body = error_body(message, status, openai)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def open_audit(settings: SecuritySettings, home: Path) -> AuditLog:
    """The audit log the settings name (default: HOME/security/audit.sqlite)."""
    return AuditLog(settings.audit_file or home / "security" / "audit.sqlite")


def build_gate(
    app: ASGIApp,
    settings: SecuritySettings,
    keys_file: Path,
    audit: AuditLog,
    registry: CollectorRegistry,
    *,
    mutual_tls: bool,
) -> SecurityGate:
    """The gate with its key store and JWT verifier opened from the settings, writing to `audit`."""
    from edgegen.security.keys import KeyStore
    from edgegen.security.tokens import JwtVerifier

    spent = keys_file.parent / "spent_tokens.sqlite"  # (every worker process's, and across restarts)
    jwt = JwtVerifier(settings.jwt, spent_file=spent) if settings.jwt is not None else None
    authn = Authenticator(KeyStore(keys_file) if settings.auth else None, jwt)
    return SecurityGate(app, settings, authn, audit, SecurityMetrics(registry), mutual_tls=mutual_tls)
