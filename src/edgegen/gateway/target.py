"""What a relayed request asks for, read once before it goes to a node: where it goes there, which model
it names, what it should stick to — and a node's redirect, made safe to pass back.

The path is read once (security/paths.py, as the security gate read it for the role) and the request line
to the node built from parts: that path encoded and the query string, in origin form, under the node's own
`Host` (upstream.py) — nothing parsed from what the client sent decides the host, so no request target
(`//host:port/`, `/v1/../admin`) can reach another host, port or route. A redirect a node answers is
relayed with a relative `Location`: its internal address never reaches the client. Pure functions of the
request; proxy.py does the relaying.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import orjson
from starlette.types import Scope

from edgegen.security.paths import canonical_path, raw_path_of, upstream_path

_MODEL_IN_PATH = re.compile(r"^/(?:v2/)?models/([^/]+)/")
# A query string is relayed as it came; only what could end the request line or start a fragment
# (space, controls, bytes beyond ASCII, `#`) is escaped.
_QUERY_SAFE = "".join(c for c in string.punctuation if c != "#")
AFFINITY_BYTES = 512  # how much of a prompt decides where it goes


@dataclass(frozen=True)
class Target:
    """What a request asks a node for: its canonical path and its query string (encoded)."""

    path: str
    query: str = ""

    @classmethod
    def of(cls, scope: Scope) -> Target:
        """The target of a request; InvalidInput (400) for a path with more than one reading. The path
        is the security gate's reading of it, when the gate has read it (it always has, in the gateway)."""
        path = scope.get("edgegen.path") or canonical_path(raw_path_of(scope))
        query: bytes = scope.get("query_string", b"")
        return cls(path, quote_from_bytes(query, safe=_QUERY_SAFE) if query else "")

    def request_target(self) -> bytes:
        """The request line's target at a node: the path encoded, the query string as it came.

        >>> Target("/models/a b/predict", "x=1").request_target()
        b'/models/a%20b/predict?x=1'
        """
        target = upstream_path(self.path) + ("?" + self.query if self.query else "")
        return target.encode("ascii")


def relative_location(location: bytes) -> bytes:
    """A redirect's target without its scheme and host: a node's own address (or one a `Host` header
    made up) never reaches the client, and the redirect stays on the gateway.

    >>> relative_location(b"http://10.0.0.5:8000/v1/models?x=1")
    b'/v1/models?x=1'
    """
    parts = urlsplit(location.decode("latin-1"))
    # Leading slashes (and backslashes, which browsers read as slashes) collapse to one: `//host/` is
    # another host.
    path = "/" + parts.path.lstrip("/\\")
    return (path + ("?" + parts.query if parts.query else "")).encode("latin-1")


def json_body(path: str, body: bytes) -> dict[str, Any] | None:
    """An OpenAI-protocol request's JSON object (parsed once, for the model and the affinity key)."""
    if not path.startswith("/v1/") or not body:
        return None
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return request if isinstance(request, dict) else None


def affinity_key(session: bytes | None, request: dict[str, Any] | None) -> bytes | None:
    """What a chat should stick to: its session (`X-Session-Id`), or the start of its conversation.

    >>> affinity_key(None, {"prompt": "Once upon a time"})
    b'Once upon a time'
    """
    if session:
        return b"session:" + session[:128]
    if request is None:
        return None
    user = request.get("user")
    if isinstance(user, str):
        return b"user:" + user.encode()[:128]
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt.encode()[:AFFINITY_BYTES]
    messages = request.get("messages")
    if isinstance(messages, list) and messages:
        # The system turn and the first user turn stay the same as a chat grows: the prefix a KV cache holds.
        return orjson.dumps(messages[:2])[:AFFINITY_BYTES]
    return None


def model_of(path: str, request: dict[str, Any] | None) -> str | None:
    """The model a request names: in its path (`/models/m/…`, `/v2/models/m/…`), or its JSON's `model`.

    >>> model_of("/v1/chat/completions", {"model": "tiny-llm"})
    'tiny-llm'
    """
    if match := _MODEL_IN_PATH.match(path):
        return match.group(1)
    model = request.get("model") if request is not None else None
    return model if isinstance(model, str) else None
