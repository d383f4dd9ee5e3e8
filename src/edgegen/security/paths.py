"""The one reading of a request's path, for the security gate (role, scan check) and the gateway (the
path it forwards): decided once, on the bytes the client sent, so no later layer can read it another way.

    canonical_path(b"/models/digits/predict")   # '/models/digits/predict'
    canonical_path(b"/v1/.%2e/admin/models")    # raises InvalidInput: a dot segment
    upstream_path("/models/my model/predict")   # '/models/my%20model/predict', what a node is sent

Percent-escapes are decoded exactly once, segment by segment, as uvicorn decodes `scope["path"]`; a
path is refused (400) when any reading of it could differ from that one:
- a dot segment (`.` or `..`, however encoded): an HTTP client or proxy on the way (aiohttp's yarl
  among them) would resolve it, so the role would be decided on one path and another one routed;
- an encoded `/` or `\\` (`%2f`, `%5c`), a backslash, an escaped `%` (`%25`: double encoding) or a
  broken escape, a control character or NUL, bytes that are not UTF-8;
- an empty segment (`//`): `//host:port/x` is a network-path reference, which a URL library joins
  into another host; a trailing `/` alone is allowed (the router answers it 404).
A request target that is not origin-form (`*`, `http://…` as the path) is refused the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

from edgegen.errors import InvalidInput

# What a path segment may hold unescaped (RFC 3986 pchar); everything else is sent percent-encoded.
_PCHAR = "!$&'()*+,;=:@"


def canonical_path(raw_path: bytes) -> str:
    """The decoded path of `raw_path` (the request target's path, as sent), or InvalidInput (400) when
    it is not the one plain reading a server, the gate and the gateway's client all agree on.

    >>> canonical_path(b"/v2/models/digits%2Dv1/infer")
    '/v2/models/digits-v1/infer'
    """
    try:
        text = raw_path.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidInput("the request path must be ASCII (percent-encode anything else)") from None
    if not text.startswith("/"):
        raise InvalidInput("the request target must be a path that starts with /")
    raw_segments = text[1:].split("/")
    decoded: list[str] = []
    for position, raw in enumerate(raw_segments):
        try:
            segment = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise InvalidInput("the request path must decode to UTF-8") from None
        if not segment and position < len(raw_segments) - 1:
            raise InvalidInput("the request path may not hold an empty segment (//)")
        if segment in (".", ".."):
            raise InvalidInput("the request path may not hold a dot segment (. or ..)")
        if "/" in segment or "\\" in segment:
            raise InvalidInput("the request path may not hold an encoded slash or a backslash")
        if "%" in segment:
            raise InvalidInput("the request path may not hold an escaped % or a broken escape")
        if not segment.isprintable():
            raise InvalidInput("the request path may not hold control characters")
        decoded.append(segment)
    return "/" + "/".join(decoded)


def raw_path_of(scope: Mapping[str, Any]) -> bytes:
    """The path of an ASGI request as the client sent it (`raw_path`); a server that gives none has
    its decoded `path` encoded again, so that every escape in it still counts."""
    raw: bytes | None = scope.get("raw_path")
    return raw if raw else quote(scope["path"], safe="/" + _PCHAR).encode("ascii")


def upstream_path(path: str) -> str:
    """A canonical path encoded for the request line to a node, which decodes it back to `path`.

    >>> upstream_path("/models/digits/predict")
    '/models/digits/predict'
    """
    return quote(path, safe="/" + _PCHAR)
