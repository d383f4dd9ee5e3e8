"""The fleet's vulnerability audit: every node's installed packages, and the gateway's own, against the OSV
advisories imported under HOME/security (`edgegen audit import`).

    GET /gateway/audit   {"advisories": n, "imported": t, "nodes": {"gateway": {...}, "n1": {...}, …}}
                         each: {"packages": n, "vulnerable": [finding, …]}, or {"error": why} for a node
                         that could not be asked

A node that cannot be asked is named with why, beside the others: one down node must not hide what the
rest run. Each scan also sets `edgegen_gateway_vulnerable_packages{node}`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from edgegen.errors import UpstreamError
from edgegen.gateway.fleet import Fleet, FleetMember
from edgegen.gateway.nodes import NodeClient
from edgegen.security.vulns import AdvisoryDb, installed_packages


class FleetAudit:
    """`advisories`: the SQLite file of imported advisories; `found(node, count)`: told each node's count of
    vulnerable packages."""

    def __init__(
        self, fleet: Fleet, nodes: NodeClient, advisories: Path, found: Callable[[str, int], None]
    ) -> None:
        self.fleet = fleet
        self.nodes = nodes
        self.advisories = advisories
        self.found = found

    async def scan(self) -> dict[str, Any]:
        db = AdvisoryDb(self.advisories)

        def report(packages: list[tuple[str, str]]) -> dict[str, Any]:
            findings = db.scan(packages)
            return {"packages": len(packages), "vulnerable": [f.__dict__ for f in findings]}

        async def one(member: FleetMember) -> dict[str, Any]:
            try:
                packages = await self._packages(member)
            except (aiohttp.ClientError, TimeoutError, UpstreamError, KeyError, TypeError, ValueError) as exc:
                return {"error": getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"}
            return report(packages)

        try:
            members = list(self.fleet.nodes.values())
            results = await asyncio.gather(*(one(m) for m in members))
            out = {
                "gateway": report(installed_packages()),
                **{m.backend.name: r for m, r in zip(members, results, strict=True)},
            }
            for name, result in out.items():
                if "vulnerable" in result:
                    self.found(name, len(result["vulnerable"]))
            return {"advisories": db.count(), "imported": db.last_import(), "nodes": out}
        finally:
            db.close()

    async def _packages(self, member: FleetMember) -> list[tuple[str, str]]:
        """What the node has installed: (name, version) pairs, from its GET /admin/packages."""
        status, body = await self.nodes.call(member, "GET", "/admin/packages", limit_s=60)
        if status != 200:
            raise UpstreamError(f"the node answered {status} to GET /admin/packages")
        return [(str(p["name"]), str(p["version"])) for p in body["packages"]]
