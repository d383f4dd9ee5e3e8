"""Draining a node before a restart or an upgrade (gateway/restarts.py): every request it has, from
every worker of the gateway, is answered before it is asked to restart."""

from __future__ import annotations

import asyncio

from edgegen.gateway.fleet import Fleet, Share
from edgegen.gateway.restarts import Restarts
from edgegen.gateway.settings import HealthSettings, NodeEntry, OperationsSettings, OutlierSettings


async def test_with_several_workers_a_drain_waits_for_the_requests_the_others_relay() -> None:
    """Another worker relays two requests to n0 (as its share of the traffic tells) when a drain begins
    in this one, which relays none: the drain lasts until that worker tells they are answered. Before, it
    counted this worker's requests alone and asked the node to restart at once, under the others'."""
    fleet = Fleet(HealthSettings(), OutlierSettings())
    fleet.add(NodeEntry(url="http://127.0.0.1:9", name="n0"))
    told: dict[str, list[Share]] = {"n0": [{"in_flight": 2}]}
    fleet.others = lambda: told
    restarts = Restarts(fleet, None, OperationsSettings(drain_timeout_s=10), told_within_s=0.1)  # type: ignore[arg-type]

    async def answered() -> None:
        await asyncio.sleep(0.4)
        told["n0"] = [{"in_flight": 0}]

    task = asyncio.create_task(answered())
    async with restarts.drained(fleet.nodes["n0"]) as drained_s:
        assert fleet.nodes["n0"].draining
        assert 0.4 <= drained_s < 5
    await task
    assert not fleet.nodes["n0"].draining


async def test_a_drain_waits_for_the_others_to_have_seen_it_before_it_trusts_their_count() -> None:
    """The others told no request in flight, but before they saw the drain: they may have sent the node
    new ones since. The drain waits `told_within_s` (two of their syncs) before it reads their count."""
    fleet = Fleet(HealthSettings(), OutlierSettings())
    fleet.add(NodeEntry(url="http://127.0.0.1:9", name="n0"))
    fleet.others = lambda: {"n0": [{"in_flight": 0}]}
    restarts = Restarts(fleet, None, OperationsSettings(drain_timeout_s=10), told_within_s=0.3)  # type: ignore[arg-type]
    async with restarts.drained(fleet.nodes["n0"]) as drained_s:
        assert 0.3 <= drained_s < 5
