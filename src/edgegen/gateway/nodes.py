"""The gateway's own calls to its nodes — status, config, restarts, rollouts, upgrades, audits — as opposed
to the client requests proxy.py relays. One client, over the proxy's keep-alive pool to each node, always
with the gateway's credentials.

    status, answer = await nodes.call(member, "GET", "/admin/status")     answer: its JSON, or None
    status, answer = await nodes.config(member, "PATCH", {"changes": {"cache.ttl_s": 5}})

What the gateway shows a node: over mutual TLS it vouches for itself as an operator (the node trusts the
principal header of a peer its CA certified); otherwise the configured operator key, if any.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

import aiohttp
from pydantic import SecretStr

from edgegen.errors import STATUS, EdgegenError, RequestError, UpstreamError
from edgegen.gateway.balancers import Backend
from edgegen.gateway.fleet import FleetMember
from edgegen.security.auth import Principal


class NodeClient:
    """`sessions`: the proxy's pool of one node (`Proxy.client`); `vouch`: mutual TLS to the nodes is on;
    `key`: the operator key the nodes take otherwise."""

    def __init__(
        self,
        sessions: Callable[[Backend], aiohttp.ClientSession],
        vouch: bool,
        key: SecretStr | None,
    ) -> None:
        self.sessions = sessions
        self.credentials: dict[str, str] = {}
        if vouch:
            self.credentials["x-edgegen-principal"] = Principal("gateway", "operator").to_header().decode()
        elif key is not None:
            self.credentials["authorization"] = f"Bearer {key.get_secret_value()}"

    async def call(
        self,
        member: FleetMember,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        limit_s: float = 10,
        headers: dict[str, str] | None = None,
        data: bytes | BinaryIO | None = None,
    ) -> tuple[int, Any]:
        """(status, JSON answer or None). The body is `body` as JSON, or the bytes `data`. A node that
        does not answer raises aiohttp's error or TimeoutError: each caller says what that means."""
        # (the pool sends no Content-Type of its own: relayed requests carry the client's)
        kind = "application/json" if body else "application/octet-stream" if data is not None else None
        async with self.sessions(member.backend).request(
            method,
            path,
            json=body,
            data=data,
            headers={**self.credentials, **({"content-type": kind} if kind else {}), **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=limit_s),
        ) as response:
            try:
                return response.status, await response.json(content_type=None)
            except ValueError:
                return response.status, None

    async def config(
        self, member: FleetMember, method: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """A node's /admin/config (GET, or PATCH with `body`); a node that does not answer is an
        UpstreamError (502)."""
        try:
            return await self.call(member, method, "/admin/config", body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = exc or type(exc).__name__
            raise UpstreamError(f"node {member.backend.name!r} cannot be reached: {reason}") from None


def refusal(status: int, message: str) -> EdgegenError:
    """A node's answer to a call the gateway makes on a client's behalf, as the error the client gets: a
    4xx as the error of the tree with that status (a 4xx the tree has no class for is a plain 400), any
    other failure as an UpstreamError (502) — the node's fault, not the client's.

    >>> type(refusal(403, "no")).__name__, type(refusal(500, "broke")).__name__
    ('Forbidden', 'UpstreamError')
    """
    if not 400 <= status < 500:
        return UpstreamError(message)
    kind = next((cls for cls, code in STATUS if code == status), RequestError)
    return kind(message)
