"""The fleet's logs as the gateway serves them: the alert analysis reads a long span without holding the
store, so the batches nodes ship meanwhile are kept as they come."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from edgegen.gateway.alerts import Analyzer
from edgegen.gateway.fleetlogs import ANALYSIS_PAGE, FleetLogs
from edgegen.gateway.logstore import LogStore
from edgegen.gateway.settings import AlertSettings, LogStoreSettings
from edgegen.observe.logs import timestamp
from edgegen.security.auth import ANONYMOUS_ADMIN
from tests.unit.cache.test_tiers import Clock


def access_lines(first: int, count: int, start: float, per_s: int) -> list[list[object]]:
    return [
        [seq, {"ts": timestamp(start + seq / per_s), "level": "info", "logger": "edgegen.access",
               "msg": "request", "status": 200, "ms": 5.0, "model": "m"}]
        for seq in range(first, first + count)
    ]  # fmt: skip


def counted(analyzer: Analyzer) -> int:
    return sum(b.requests for buckets in analyzer._series.values() for b in buckets.values())


async def test_a_new_leader_takes_up_a_long_span_page_by_page_while_nodes_ship(tmp_path: Path) -> None:
    """A worker that takes the lead reads the analysis' whole span (here 2.5 pages of access lines). A
    batch a node ships meanwhile is kept before the analysis is done, and the analysis counts it too."""
    clock = Clock()
    per_s = 50
    total = ANALYSIS_PAGE * 5 // 2
    start = clock.now - total / per_s - 1
    store = LogStore(tmp_path / "fleet.sqlite")
    store.add("n1", "a", access_lines(0, total, start, per_s))
    analyzer = Analyzer(AlertSettings(window_s=60, baseline_s=3_600), clock=clock)
    logs = FleetLogs(store, analyzer, LogStoreSettings())
    analysis = asyncio.create_task(logs.analyse())
    await asyncio.sleep(0)  # the analysis holds the store, reading its first page
    batch = {"node": "n2", "spool": "b", "entries": access_lines(0, 10, clock.now - 1, per_s)}
    assert await logs.receive(orjson.dumps(batch), ANONYMOUS_ADMIN) == {"stored": 10}
    assert not analysis.done()  # the batch did not wait for the whole span to be read
    await analysis
    assert counted(analyzer) == total + 10
    store.close()
