"""A security gate in process, in front of an app that only notes who the gate let in."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from edgegen.security.auth import Authenticator, Principal
from edgegen.security.gate import SecurityGate, SecurityMetrics
from edgegen.security.settings import SecuritySettings


def noting_gate(
    settings: SecuritySettings, authenticator: Authenticator
) -> tuple[SecurityGate, list[Principal]]:
    """The gate, and the principals it passed on, in the order the app saw them."""
    seen: list[Principal] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["edgegen.principal"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = SecurityGate(app, settings, authenticator, None, SecurityMetrics(CollectorRegistry()))
    return gate, seen
