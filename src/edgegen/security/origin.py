"""Same-origin checks: a browser must not be the way into a server that trusts its network.

A page of evil.example may send a simple POST anywhere (no preflight, its own `Origin`), and with DNS
rebinding — evil.example made to resolve to 127.0.0.1 — it reaches a server on loopback with `Host:
evil.example`. Neither needs a credential where authentication is off. So a server answers such requests
only under a `Host` that is its own, and takes a change only from its own origin:

    check = SameOrigin(["edge.example.com"])
    check.host_ok(b"127.0.0.1:8000")                       # True
    check.host_ok(b"evil.example")                         # False
    check.refusal("POST", [(b"host", b"127.0.0.1:8000"), (b"origin", b"http://evil.example")])
    # 'a cross-site request may not change anything here'

A `Host` is ours when it is an address (no attacker can make a browser send one of ours for a page of
its own), a loopback name (`localhost`, `*.localhost`, which browsers resolve themselves), this
machine's name, or listed in `security.allowed_hosts`. Ports are not compared: a name that is ours is
ours on every port. A request without `Origin` (curl, the CLI, the gateway) is no browser's cross-site
request; a request without `Host` (HTTP/1.0) is no browser's either.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

from edgegen.memo import Memo

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?$")
_ORIGIN = re.compile(r"^(?P<scheme>https?)://(?P<authority>[^/?#@]+)$")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
HeaderList = Iterable[tuple[bytes, bytes]]


def parse_host(value: str) -> tuple[str, str | None] | None:
    """(name, port) of a `Host` value, the name lower-case without a trailing dot; None if malformed.

    >>> parse_host("LocalHost.:8000")
    ('localhost', '8000')
    >>> parse_host("[::1]")
    ('::1', None)
    """
    match = _HOST.match(value.lower())
    if match is None:
        return None
    name = match["v6"] or match["name"].rstrip(".")
    return (name, match["port"]) if name else None


def same_origin(origin: bytes, host: bytes) -> bool:
    """Whether `Origin` names the server reached under `host` (scheme aside; a default port may be
    left out on either side).

    >>> same_origin(b"https://gw.example", b"gw.example:443")
    True
    >>> same_origin(b"http://127.0.0.1:8001", b"127.0.0.1:8000")
    False
    """
    match = _ORIGIN.match(origin.decode("latin-1").lower())
    if match is None:  # `null` (a sandboxed page, a file) or no origin at all
        return False
    ours, theirs = parse_host(host.decode("latin-1")), parse_host(match["authority"])
    if ours is None or theirs is None or ours[0] != theirs[0]:
        return False
    default = _DEFAULT_PORTS[match["scheme"]]
    return (ours[1] or default) == (theirs[1] or default)


class SameOrigin:
    """The names a server answers to, and the refusal of a request from a browser elsewhere."""

    def __init__(self, allowed_hosts: Iterable[str]) -> None:
        self.names = frozenset({*(h.lower() for h in allowed_hosts), socket.gethostname().lower()})
        self._verdicts: Memo[bytes, bool] = Memo(1024)  # Host value → answered here; a client repeats it

    def host_ok(self, host: bytes) -> bool:
        known = self._verdicts.get(host)
        if known is None:
            known = self._host_ok(host)
            if len(host) <= 255:  # (no longer name is a host's: not remembered)
                self._verdicts.remember(host, known)
        return known

    def _host_ok(self, host: bytes) -> bool:
        parsed = parse_host(host.decode("latin-1"))
        if parsed is None:
            return False
        name = parsed[0]
        if name == "localhost" or name.endswith(".localhost") or name in self.names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def refusal(self, method: str, headers: HeaderList, *, proxied: bool = False) -> str | None:
        """Why this request may not be answered here, or None. `proxied`: it comes from a trusted proxy,
        whose `X-Forwarded-Host` names the origin the client reached (the proxy checked that name)."""
        host = origin = forwarded = None
        for key, value in headers:
            if key == b"host":
                host = value
            elif key == b"origin":
                origin = value
            elif key == b"x-forwarded-host":
                forwarded = value
        if host is not None and not self.host_ok(host):
            return "this server does not answer to that Host; name it in security.allowed_hosts"
        if origin is None or method in SAFE_METHODS:
            return None
        own = forwarded if proxied and forwarded is not None else host
        if own is None or not same_origin(origin, own):
            return "a cross-site request may not change anything here"
        return None
