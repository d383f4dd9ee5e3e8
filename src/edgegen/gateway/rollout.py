"""Rolling a model version out across the fleet, one node at a time, behind a health gate.

    POST /gateway/rollout   {"model": "digits", "version": "3"}               a version the nodes hold
                            {"model": "digits", "url": "https://…/pkg.tar.gz"}  a signed package each
                                                                               node pulls (allowed sources)
    POST /gateway/models/{model}/rollout[?version=3]   body: a signed package archive, pushed to each node
    POST /gateway/rollback  {"model": "digits"[, "version": "2"]}             the versions served before
                                                                               the last rollout, or this one

Per node, in the fleet's order: note the version it serves, activate (or pull, or receive, and activate)
the new one, then the gate — the node serves the new version and is ready, a probe inference (zeros of
the model's input shape; one token for a language model) answers 200, and for `observe_s` the traffic the
gateway sends it stays under `max_error_rate` 5xx. A node that fails the gate goes back to its version, so
do the nodes already done, and the rollout stops: the fleet ends where it began.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgegen.errors import Conflict
from edgegen.gateway.fleet import Fleet, FleetMember
from edgegen.gateway.settings import OperationsSettings
from edgegen.store.manifest import NAME_PATTERN

log = logging.getLogger("edgegen.gateway")
NodeCall = Callable[..., Awaitable[tuple[int, Any]]]
NAME = NAME_PATTERN.pattern  # model names and versions, as the store has them
PUSH_LIMIT_S = 3600.0  # sending a large package to a node over a slow link


class RolloutOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=NAME)
    version: str | None = Field(None, pattern=NAME)
    url: str | None = Field(None, max_length=2048)
    nodes: list[str] | None = Field(None, description="these nodes, in this order (default: the fleet)")

    @model_validator(mode="after")
    def _one_source(self) -> RolloutOrder:
        if (self.version is None) == (self.url is None):
            raise ValueError("give a version the nodes hold, or the url of a package to pull")
        return self


class RollbackOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=NAME)
    version: str | None = Field(
        None, pattern=NAME, description="default: each node's version before the last rollout"
    )


class GateFailed(Conflict):
    """A change of the fleet that cannot be made, or a node that failed its gate (409 when it reaches the
    client: the fleet is not in a state that allows it)."""


def gated(call: NodeCall) -> NodeCall:
    """`call`, a node that gives no answer (refused, reset, timed out: restarting, gone, too slow) raising
    GateFailed. To a rollout or an upgrade that is a node failing its gate: it stops, and what it changed
    goes back, where an exception of the HTTP client would have left the fleet half changed."""

    async def ask(state: FleetMember, method: str, path: str, *args: Any, **kwargs: Any) -> tuple[int, Any]:
        try:
            return await call(state, method, path, *args, **kwargs)
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = str(exc) or type(exc).__name__
            raise GateFailed(f"{state.backend.name}: {method} {path} got no answer: {problem}") from None

    return ask


@dataclass
class Step:
    node: str
    previous: str | None
    version: str | None = None
    took_s: float = 0.0

    def view(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "previous": self.previous,
            "version": self.version,
            "took_s": round(self.took_s, 3),
        }


@dataclass
class Rollouts:
    fleet: Fleet
    call: NodeCall  # (state, method, path, body=None, limit_s=10) -> (status, JSON)
    settings: OperationsSettings
    # model -> node -> version; with several workers, kept in their shared file (shared.py)
    before: MutableMapping[str, dict[str, str | None]] = field(default_factory=dict)
    lock: AbstractAsyncContextManager[Any] = field(default_factory=asyncio.Lock)  # or shared.FleetLock

    def __post_init__(self) -> None:
        self.call = gated(self.call)

    async def rollout(self, order: RolloutOrder, package: Path | None = None) -> dict[str, Any]:
        """`package`: a signed package archive pushed to each node (filed as `order.version`, when given)."""
        async with self.lock:  # one change of the fleet at a time
            states = self.targets(order.nodes)
            done: list[Step] = []
            for state in states:
                step = Step(state.backend.name, None)  # (what it serves: not known yet, nothing changed)
                began = time.monotonic()
                try:
                    step.previous = await self._served(state, order.model)
                    step.version = await self._change(state, order, package)
                    await self._gate(state, order.model, step.version)
                except GateFailed as exc:
                    log.warning(
                        "rollout stopped", extra={"node": step.node, "model": order.model, "reason": str(exc)}
                    )
                    restored = await self._restore(order.model, [step, *reversed(done)])
                    return {"ok": False, "model": order.model, "failed": step.node, "reason": str(exc),
                            "rolled_back": restored}  # fmt: skip
                step.took_s = time.monotonic() - began
                done.append(step)
                log.info(
                    "rollout step done",
                    extra={"node": step.node, "model": order.model, "version": step.version},
                )
            self.before[order.model] = {step.node: step.previous for step in done}
            return {"ok": True, "model": order.model, "nodes": [step.view() for step in done]}

    async def rollback(self, order: RollbackOrder) -> dict[str, Any]:
        if order.version is not None:
            return await self.rollout(RolloutOrder(model=order.model, version=order.version))
        before = self.before.get(order.model)
        if not before:
            raise GateFailed(
                f"no rollout of {order.model!r} to roll back since this gateway started; name a version"
            )
        async with self.lock:
            restored = await self._restore(
                order.model, [Step(node, version) for node, version in before.items()]
            )
        self.before.pop(order.model, None)
        return {"ok": all(r["restored"] for r in restored), "model": order.model, "rolled_back": restored}

    # -- steps -----------------------------------------------------------------------------------------------
    def targets(self, names: list[str] | None) -> list[FleetMember]:
        chosen = names if names is not None else list(self.fleet.nodes)
        unknown = [n for n in chosen if n not in self.fleet.nodes]
        if unknown:
            raise GateFailed(f"unknown nodes: {', '.join(unknown)}")
        return [self.fleet.nodes[n] for n in chosen]

    async def _served(self, state: FleetMember, model: str) -> str | None:
        status, answer = await self.call(state, "GET", "/admin/models")
        if status != 200:
            raise GateFailed(f"{state.backend.name}: GET /admin/models answered {status}")
        return next((m["served"] for m in answer["models"] if m["name"] == model), None)

    async def _change(self, state: FleetMember, order: RolloutOrder, package: Path | None) -> str:
        name = state.backend.name
        if package is not None:
            query = urlencode({"activate": "true", **({"version": order.version} if order.version else {})})
            with package.open("rb") as data:
                status, answer = await self.call(
                    state,
                    "PUT",
                    f"/admin/models/{order.model}/package?{query}",
                    data=data,
                    limit_s=PUSH_LIMIT_S,
                )
            if status != 201:
                raise GateFailed(f"{name}: the push answered {status}: {reason(answer)}")
            return str(answer["version"])
        if order.url is not None:
            status, answer = await self.call(
                state,
                "POST",
                f"/admin/models/{order.model}/pull",
                {"url": order.url, "activate": True},
                limit_s=600,
            )
            if status != 201:
                raise GateFailed(f"{name}: the pull answered {status}: {reason(answer)}")
            return str(answer["version"])
        assert order.version is not None
        status, answer = await self.call(
            state, "POST", f"/admin/models/{order.model}/activate", {"version": order.version}, limit_s=300
        )
        if status != 200:
            raise GateFailed(
                f"{name}: activating version {order.version} answered {status}: {reason(answer)}"
            )
        return order.version

    async def _gate(self, state: FleetMember, model: str, version: str) -> None:
        name = state.backend.name
        deadline = time.monotonic() + self.settings.restart_timeout_s
        while True:
            status, answer = await self.call(state, "GET", "/admin/status")
            if status == 200 and answer["ready"] and answer["models"].get(model) == version:
                break
            if time.monotonic() > deadline:
                raise GateFailed(f"{name}: not ready with version {version} in time")
            await asyncio.sleep(0.2)
        await self.probe(state, model)
        await self.watch(state)

    async def watch(self, state: FleetMember) -> None:
        """The gate's last part: for `observe_s`, the traffic the node gets stays under `max_error_rate`."""
        s, traffic = self.settings, state.traffic
        before = len(traffic.tries)
        await asyncio.sleep(s.observe_s)
        recent = list(traffic.tries)[before:] if len(traffic.tries) > before else []
        failed = sum(f for _, _, f in recent)
        if len(recent) >= 10 and failed / len(recent) > s.max_error_rate:
            raise GateFailed(
                f"{state.backend.name}: {failed} of {len(recent)} requests failed while it was watched"
            )

    async def probe(self, state: FleetMember, model: str) -> None:
        """One inference on the new version, computed (not from the response cache): it must answer 200."""
        name = state.backend.name
        status, meta = await self.call(state, "GET", f"/v2/models/{model}")
        if status != 200:
            raise GateFailed(f"{name}: GET /v2/models/{model} answered {status}")
        if meta["platform"] == "llama.cpp_gguf":
            path, body = (
                "/v1/completions",
                {"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0},
            )
        else:
            inputs = []
            for tensor in meta["inputs"]:
                shape = [1 if d < 0 else d for d in tensor["shape"]]
                count = 1
                for d in shape:
                    count *= d
                inputs.append({"name": tensor["name"], "shape": shape, "datatype": tensor["datatype"],
                               "data": [0] * count})  # fmt: skip
            path, body = f"/v2/models/{model}/infer", {"inputs": inputs}
        status, answer = await self.call(
            state, "POST", path, body, limit_s=60, headers={"cache-control": "no-store, no-cache"}
        )
        if status != 200:
            raise GateFailed(f"{name}: the probe inference answered {status}: {reason(answer)}")

    async def _restore(self, model: str, steps: list[Step]) -> list[dict[str, Any]]:
        """Each node of `steps` back to its previous version (those that had one)."""
        restored = []
        for step in steps:
            state = self.fleet.nodes.get(step.node)
            if state is None or step.previous is None:
                restored.append({"node": step.node, "version": step.previous, "restored": state is not None})
                continue
            try:
                status, answer = await self.call(
                    state, "POST", f"/admin/models/{model}/activate", {"version": step.previous}, limit_s=300
                )
            except GateFailed as exc:
                status, answer = 0, {"error": str(exc)}
            ok = status == 200
            if not ok:
                log.error(
                    "rollback failed", extra={"node": step.node, "model": model, "reason": reason(answer)}
                )
            restored.append({"node": step.node, "version": step.previous, "restored": ok})
        return restored


def reason(answer: Any) -> str:
    if isinstance(answer, dict):
        error = answer.get("error")
        return str(error.get("message") if isinstance(error, dict) else error)
    return "no JSON answer"
