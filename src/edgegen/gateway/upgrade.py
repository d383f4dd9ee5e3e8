"""Upgrading edgegen itself on the fleet's nodes, one node at a time, behind a health gate.

    POST /gateway/upgrade[?nodes=a,b]   body: an edgegen wheel; X-Edgegen-Wheel: its file name;
                                        X-Edgegen-Signature: its signature record (`edgegen software sign`)

Per node, in the fleet's order (node/software.py does the node's part):
1. stage: the node checks the signature, installs the wheel into an environment of its own and imports it
   once. A node that refuses stops the upgrade before anything of it changed.
2. drain the node, switch it: it stops gracefully and starts again as the new version, on trial.
3. the gate: a newer process is ready, runs the new environment, a probe inference of every model it
   serves answers 200; back in the fleet, its traffic stays under `max_error_rate` 5xx for `observe_s`.
4. confirm: the node keeps the new version.

A node that fails the gate goes back to the environment it ran (leaving its trial; one that never comes
back leaves it by itself when its `software.trial_s` is up), so do the nodes already upgraded, and the
upgrade stops: the fleet ends on the software it began with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from edgegen.errors import DeadlineExceeded
from edgegen.gateway.fleet import FleetMember
from edgegen.gateway.rollout import GateFailed, NodeCall, Rollouts, gated, reason

log = logging.getLogger("edgegen.gateway")
Drain = Callable[[FleetMember], AbstractAsyncContextManager[float]]
ReadyAgain = Callable[[FleetMember, dict[str, Any]], Awaitable[dict[str, Any]]]
STAGE_LIMIT_S = 900.0  # making an environment and installing a wheel, on a slow node


@dataclass
class Wheel:
    filename: str
    data: bytes
    signature: str


@dataclass
class Upgrades:
    rollouts: Rollouts  # the fleet, the gate's probe and watch, and the lock of fleet changes
    call: NodeCall
    drained: Drain
    ready_again: ReadyAgain

    def __post_init__(self) -> None:
        self.call = gated(self.call)

    async def upgrade(self, wheel: Wheel, nodes: list[str] | None) -> dict[str, Any]:
        async with self.rollouts.lock:  # one change of the fleet at a time
            done: list[dict[str, Any]] = []
            for state in self.rollouts.targets(nodes):
                began = time.monotonic()
                try:
                    step = await self._stage(state, wheel)
                except GateFailed as exc:  # nothing of this node changed
                    return await self._stop(state, exc, done, [])
                if step["previous"] != step["env"]:
                    try:
                        await self._switch(state, step)
                    except GateFailed as exc:
                        return await self._stop(state, exc, done, [await self._back(state, step["previous"])])
                step["took_s"] = round(time.monotonic() - began, 3)
                done.append(step)
                log.info("software upgrade step done", extra=step)
            return {"ok": True, "nodes": done}

    async def _stop(
        self, state: FleetMember, exc: GateFailed, done: list[dict[str, Any]], restored: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The upgrade stops at `state`: the nodes done go back too."""
        name = state.backend.name
        log.warning("software upgrade stopped", extra={"node": name, "reason": str(exc)})
        for step in reversed(done):
            restored.append(await self._back(self.rollouts.fleet.nodes[step["node"]], step["previous"]))
        return {"ok": False, "failed": name, "reason": str(exc), "rolled_back": restored, "nodes": done}

    async def _stage(self, state: FleetMember, wheel: Wheel) -> dict[str, Any]:
        name = state.backend.name
        status, staged = await self.call(
            state,
            "PUT",
            f"/admin/software/wheels/{wheel.filename}",
            data=wheel.data,
            headers={"x-edgegen-signature": wheel.signature},
            limit_s=STAGE_LIMIT_S,
        )
        if status != 201:
            raise GateFailed(f"{name}: staging answered {status}: {reason(staged)}")
        previous = (await self._status(state))["software"]["env"]
        return {"node": name, "previous": previous, "env": staged["env"], "version": staged["version"]}

    async def _switch(self, state: FleetMember, step: dict[str, Any]) -> None:
        name, env = state.backend.name, step["env"]
        async with self.drained(state):
            after = await self._restart(state, "/admin/software/switch", {"env": env})
            if after["software"]["env"] != env:
                raise GateFailed(
                    f"{name}: came back on {after['software']['env']}: {await self._failure(state)}"
                )
            for model in after["models"]:
                await self.rollouts.probe(state, model)
        await self.rollouts.watch(state)
        await self._confirm(state)

    async def _back(self, state: FleetMember, env: str) -> dict[str, Any]:
        """The node back on `env`: leave its trial, or switch to it on trial and confirm."""
        name = state.backend.name
        try:
            status, software = await self.call(state, "GET", "/admin/software")
            if status != 200:
                raise GateFailed(f"{name}: GET /admin/software answered {status}")
            trial = software["trial"]
            if software["running"] == env and trial is None:
                return {"node": name, "env": env, "restored": True}
            leaving = trial is not None and trial["from"] == env and trial["env"] == software["running"]
            async with self.drained(state):
                if leaving:
                    after = await self._restart(state, "/admin/software/rollback")
                else:
                    after = await self._restart(state, "/admin/software/switch", {"env": env})
            if after["software"]["env"] != env:
                raise GateFailed(f"{name}: came back on {after['software']['env']}")
            if not leaving:
                await self._confirm(state)
        except GateFailed as exc:
            log.error("software rollback failed", extra={"node": name, "env": env, "reason": str(exc)})
            return {"node": name, "env": env, "restored": False, "reason": str(exc)}
        return {"node": name, "env": env, "restored": True}

    async def _restart(
        self, state: FleetMember, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Ask the node to change environment (`path`, 202), then its status once a newer process is ready."""
        before = await self._status(state)
        status, answer = await self.call(state, "POST", path, body)
        if status != 202:
            raise GateFailed(f"{state.backend.name}: {path} answered {status}: {reason(answer)}")
        return await self._ready(state, before)

    async def _confirm(self, state: FleetMember) -> None:
        status, answer = await self.call(state, "POST", "/admin/software/confirm")
        if status != 200:
            raise GateFailed(f"{state.backend.name}: confirming answered {status}: {reason(answer)}")

    async def _status(self, state: FleetMember) -> dict[str, Any]:
        status, answer = await self.call(state, "GET", "/admin/status")
        if status != 200:
            raise GateFailed(f"{state.backend.name}: GET /admin/status answered {status}")
        return answer  # type: ignore[no-any-return]

    async def _ready(self, state: FleetMember, before: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.ready_again(state, before)
        except DeadlineExceeded as exc:
            raise GateFailed(f"{state.backend.name}: {exc.message}") from None

    async def _failure(self, state: FleetMember) -> str:
        """Why the node left the new version, as it recorded it."""
        status, software = await self.call(state, "GET", "/admin/software")
        failure = software.get("last_failure") if status == 200 and isinstance(software, dict) else None
        return str(failure["reason"]) if failure else "the new version did not stay"
