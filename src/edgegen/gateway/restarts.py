"""Restarting nodes in place without a request ever meeting one down.

    POST /gateway/nodes/{name}/restart   drain the node (no new requests; those it has are answered, or
                                         `drain_timeout_s` runs out), ask it to restart, wait until a newer
                                         process of it is ready (`restart_timeout_s`), put it back
    POST /gateway/restart                every node so, in turn: the fleet keeps serving throughout

The drain and the wait for a newer process are also the upgrade's (upgrade.py), which restarts a node
into another environment the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from edgegen.errors import DeadlineExceeded, EdgegenError, NotFound, UpstreamError, status_of
from edgegen.gateway.fleet import Fleet, FleetMember
from edgegen.gateway.nodes import NodeClient
from edgegen.gateway.settings import OperationsSettings

log = logging.getLogger("edgegen.gateway")


class Restarts:
    def __init__(
        self, fleet: Fleet, nodes: NodeClient, settings: OperationsSettings, told_within_s: float = 0.0
    ) -> None:
        """`told_within_s`: with several workers, how long until every other worker has seen a drain and
        told its requests in flight since (two of their syncs); 0 with one process."""
        self.fleet = fleet
        self.nodes = nodes
        self.settings = settings
        self.told_within_s = told_within_s

    async def restart(self, name: str) -> dict[str, Any]:
        """Drain `name`, restart it in place, wait until a new process of it is ready, put it back."""
        member = self.fleet.nodes.get(name)
        if member is None:
            raise NotFound(f"no node named {name!r}")
        began = time.monotonic()
        async with self.drained(member) as drained_s:
            try:
                status, before = await self.nodes.call(member, "GET", "/admin/status")
                if status != 200:
                    raise UpstreamError(f"node {name!r} answered {status} to GET /admin/status")
                status, _ = await self.nodes.call(member, "POST", "/admin/restart")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamError(f"node {name!r} cannot be reached: {exc or type(exc).__name__}") from None
            if status != 202:
                raise UpstreamError(f"node {name!r} answered {status} to POST /admin/restart")
            after = await self.ready_again(member, before)
        member.record_status(after)
        log.info("node restarted", extra={"node": name, "took_s": round(time.monotonic() - began, 3)})
        return {"node": name, "drained_s": round(drained_s, 3), "took_s": round(time.monotonic() - began, 3),
                "started_before": before["started_at"], "started": after["started_at"]}  # fmt: skip

    async def restart_all(self) -> dict[str, Any]:
        """Every node in turn, so the fleet keeps serving; a node that does not come back stops it there
        (the rest keep serving as they are), and the answer says which, with the status and reason its
        own restart would have answered."""
        restarted = []
        for name in list(self.fleet.nodes):
            try:
                restarted.append(await self.restart(name))
            except EdgegenError as exc:
                failed = {"node": name, "status": status_of(exc), "reason": exc.message}
                return {"ok": False, "restarted": restarted, "failed": failed}
        return {"ok": True, "restarted": restarted}

    @contextlib.asynccontextmanager
    async def drained(self, member: FleetMember) -> AsyncIterator[float]:
        """While inside: the node gets no new requests, and those it had are answered (or the drain
        timed out); gives the seconds that took. With several workers, those the others relay count
        too: once each has seen the drain (it sends the node nothing new) and told its count since."""
        name = member.backend.name
        began = time.monotonic()
        self.fleet.set_draining(name, True)
        log.info("draining node", extra={"node": name})
        try:
            while (waited := time.monotonic() - began) < self.settings.drain_timeout_s:
                if waited >= self.told_within_s and not self.fleet.in_flight().get(name):
                    break  # every request it had, from every worker, is answered
                await asyncio.sleep(0.02)
            yield time.monotonic() - began
        finally:
            self.fleet.set_draining(name, False)

    async def ready_again(self, member: FleetMember, before: dict[str, Any]) -> dict[str, Any]:
        """The node's status once a process newer than `before`'s answers and is ready; DeadlineExceeded
        (504) when none is within `restart_timeout_s`."""
        deadline = time.monotonic() + self.settings.restart_timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            try:
                status, now = await self.nodes.call(member, "GET", "/admin/status", limit_s=2)
            except (aiohttp.ClientError, TimeoutError):
                continue  # between the old process and the new one
            if status == 200 and now["started_at"] > before["started_at"] and now["ready"]:
                return now  # type: ignore[no-any-return]
        raise DeadlineExceeded(f"node {member.backend.name!r} was not ready again in time")
