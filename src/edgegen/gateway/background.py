"""What the gateway does besides answering requests, one task per loop for as long as it serves (`running`):

    health      every node's GET /v2/health/ready, all at once, every `health.interval_s` (fleet.py judges)
    status      every node's GET /admin/status, every `health.status_interval_s`: the fleet view's version,
                models and load; then a point of each node's traffic history
    analysis    the access lines kept since its last round into the alert analysis, every
                `alerts.evaluate_s`
    purge       the fleet's log lines older than `logs.retention_s`, every minute
    own lines   the gateway's own log records into the fleet's logs, every second (when `logs.own` names it)

A round that fails is logged and the loop goes on: observability never breaks serving.

With several workers (shared.py), health, status, analysis and purge run in one of them, the leader;
every worker tells its share of the traffic and reads the shared fleet every `sync_s` (others' admin
changes, the leader's verdicts) and takes the lead when the leader is gone. Own lines run in each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import aiohttp

from edgegen.gateway.fleet import Fleet, FleetMember
from edgegen.gateway.fleetlogs import FleetLogs
from edgegen.gateway.logstore import OwnLines
from edgegen.gateway.nodes import NodeClient
from edgegen.gateway.settings import HealthSettings
from edgegen.gateway.shared import SharedFleet, sync_interval
from edgegen.gateway.state import GatewayState

log = logging.getLogger("edgegen.gateway")
PURGE_EVERY_S = 60.0
OWN_LINES_EVERY_S = 1.0
Round = tuple[float, Callable[[], Awaitable[None]], str]  # (every so many seconds, work, what a failure says)


@contextlib.asynccontextmanager
async def running(state: GatewayState) -> AsyncIterator[None]:
    """The loops, started on entry and stopped on exit (the gateway's own last lines kept first)."""
    s = state.settings
    timeout = aiohttp.ClientTimeout(total=s.health.timeout_s)
    connector = aiohttp.TCPConnector(ssl=state.proxy.node_ssl or True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as client:
        statuses = partial(read_statuses, state.fleet, state.nodes, s.health, state.shared)
        leading: list[Round] = [
            (s.health.interval_s, partial(check_health, state.fleet, client), "health check round failed"),
            (s.health.status_interval_s, statuses, "reading the nodes' status failed"),
            (PURGE_EVERY_S, partial(purge, state.logs), "fleet log purge failed"),
            (s.alerts.evaluate_s, partial(analyse, state), "log analysis failed"),
        ]
        rounds: list[Round] = []
        handler = OwnLines(s.logs.own, logging.getLevelName(s.logs.own_level.upper())) if s.logs.own else None
        if handler is not None:
            logging.getLogger().addHandler(handler)
            keep = partial(state.logs.keep_own, handler)
            rounds.append((OWN_LINES_EVERY_S, keep, "keeping the gateway's own log lines failed"))
        tasks = [asyncio.create_task(every(*r)) for r in rounds]
        if state.shared is None:
            tasks += [asyncio.create_task(every(*r)) for r in leading]
        else:
            sync_s = sync_interval(s.health)
            tasks.append(asyncio.create_task(follow(state, state.shared, leading, sync_s)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                await state.logs.keep_own(handler)


async def follow(state: GatewayState, shared: SharedFleet, leading: list[Round], sync_s: float) -> None:
    """A worker of several: tell its share of the traffic and take the shared fleet every `sync_s`, and
    lead once nobody does."""
    led: list[asyncio.Task[None]] = []
    try:
        while True:
            try:
                shared.publish()
                for member in shared.sync():
                    await state.proxy.retire(member.backend)
                if not led and shared.lead():
                    log.info("this worker leads the fleet's checks", extra={"pid": os.getpid()})
                    state.analyzer.resume(shared.alerts())  # as the last leader left them, if one did
                    led = [asyncio.create_task(every(*r)) for r in leading]
            except Exception:
                log.exception("reading the shared fleet failed")
            await asyncio.sleep(sync_s)
    finally:
        for task in led:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def every(interval_s: float, work: Callable[[], Awaitable[None]], failure: str) -> None:
    """`work` now, then every `interval_s` after the end of the last round, until cancelled."""
    while True:
        try:
            await work()
        except Exception:
            log.exception(failure)
        await asyncio.sleep(interval_s)


async def check_health(fleet: Fleet, client: aiohttp.ClientSession) -> None:
    """One round of active checks, all nodes at once (no credentials: the route is public)."""

    async def one(name: str, url: str) -> None:
        try:
            async with client.get(f"{url}/v2/health/ready") as response:
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        fleet.record_check(name, ok)

    await asyncio.gather(*(one(name, m.backend.url) for name, m in list(fleet.nodes.items())))


async def read_statuses(
    fleet: Fleet, nodes: NodeClient, health: HealthSettings, shared: SharedFleet | None = None
) -> None:
    """Every node's GET /admin/status, for the fleet view: version, models, load; then a history point.
    With several workers the statuses go to the shared fleet, for the others' views."""

    async def one(member: FleetMember) -> None:
        try:
            status, answer = await nodes.call(member, "GET", "/admin/status", limit_s=health.timeout_s * 2)
        except (aiohttp.ClientError, TimeoutError) as exc:
            member.status_error = f"{type(exc).__name__}: {exc}"
            return
        if status != 200 or not isinstance(answer, dict):
            member.status_error = f"GET /admin/status answered {status}"
            return
        try:
            member.record_status(answer)
        except (KeyError, TypeError, ValueError) as exc:
            member.status_error = f"GET /admin/status answered {type(exc).__name__}: {exc}"

    members = list(fleet.nodes.values())
    await asyncio.gather(*(one(member) for member in members))
    points = fleet.sample(time.time())  # (with several workers, of the traffic all of them relayed)
    if shared is not None:
        shared.statuses(members, points)


async def analyse(state: GatewayState) -> None:
    """The access lines kept since the last round into the analysis, then its comparison; with several
    workers the leader runs it, on every worker's lines, and keeps the alerts for all."""
    analyzer = state.analyzer
    await state.logs.analyse()
    changes = analyzer.changes
    now = analyzer.clock()
    findings = await asyncio.to_thread(analyzer.compare, now)  # (the medians: off the event loop)
    for alert in analyzer.settle(findings, now):
        state.metrics.alert_raised(alert)
    if state.shared is not None and analyzer.changes != changes:
        state.shared.keep_alerts(analyzer.board())


async def purge(logs: FleetLogs) -> None:
    dropped = await logs.purge()
    if dropped:
        log.info("fleet log lines purged", extra={"count": dropped})
