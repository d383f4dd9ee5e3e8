"""The fleet that gateway workers share (gateway/shared.py): two workers' views over one real SQLite file,
as two processes would hold them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from edgegen.errors import ConfigError
from edgegen.gateway.alerts import Analyzer
from edgegen.gateway.fleet import Fleet
from edgegen.gateway.fleetlogs import FleetLogs
from edgegen.gateway.logstore import LogStore
from edgegen.gateway.settings import (
    AlertSettings,
    HealthSettings,
    LogStoreSettings,
    NodeEntry,
    OutlierSettings,
)
from edgegen.gateway.shared import SHARE_STALE_S, SharedFleet
from edgegen.observe.logs import timestamp
from edgegen.security.auth import Principal
from tests.threaded import read_while_written


def worker(directory: Path, nodes: int = 3) -> SharedFleet:
    """A worker as app.py builds it: the configured nodes, then the shared fleet."""
    fleet = Fleet(
        HealthSettings(unhealthy_after=1), OutlierSettings(consecutive_failures=2, max_ejected_share=1.0)
    )
    for i in range(nodes):
        fleet.add(NodeEntry(url=f"http://127.0.0.1:{9000 + i}", name=f"n{i}"))
    return SharedFleet(directory, fleet)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[SharedFleet, SharedFleet]:
    a, b = worker(tmp_path), worker(tmp_path)
    yield a, b
    a.close()
    b.close()


def names(shared: SharedFleet) -> list[str]:
    return [b.name for b in shared.fleet.available()]


def test_admin_changes_of_one_worker_reach_the_other_at_its_next_sync(
    pair: tuple[SharedFleet, SharedFleet],
) -> None:
    a, b = pair
    a.fleet.set_draining("n0", True)
    a.fleet.set_weight("n1", 5)
    assert names(b) == ["n0", "n1", "n2"]  # not yet: b has not looked
    b.sync()
    assert names(b) == ["n1", "n2"]
    assert b.fleet.nodes["n1"].backend.weight == 5
    added = b.fleet.add(NodeEntry(url="http://127.0.0.1:9100", name="late"))
    gone = a.fleet.remove("n2")
    assert a.sync() == []  # a knew n2 was gone; it takes `late`
    assert list(a.fleet.nodes) == ["n0", "n1", "late"]
    assert [m.backend.name for m in b.sync()] == [gone.backend.name]  # b learns n2 left: its pools close
    assert list(b.fleet.nodes) == ["n0", "n1", "late"]
    assert b.fleet.nodes["late"] is added  # the same member, its traffic kept


def test_a_name_or_url_taken_in_another_worker_is_refused_there_too(
    pair: tuple[SharedFleet, SharedFleet],
) -> None:
    a, b = pair
    a.fleet.add(NodeEntry(url="http://127.0.0.1:9100", name="late"))
    with pytest.raises(ConfigError):  # b has not synced, but the shared file knows
        b.fleet.add(NodeEntry(url="http://127.0.0.1:9101", name="late"))
    with pytest.raises(ConfigError):
        b.fleet.add(NodeEntry(url="http://127.0.0.1:9100", name="other"))
    assert "late" not in b.fleet.nodes  # refused whole
    b.sync()
    assert b.fleet.nodes["late"].backend.url == "http://127.0.0.1:9100"


def test_verdicts_decided_in_one_worker_hold_in_every_worker(pair: tuple[SharedFleet, SharedFleet]) -> None:
    a, b = pair
    a.fleet.record_check("n0", ok=False)  # the leader's health check
    for _ in range(2):  # the failures one worker saw: an ejection
        b.fleet.record_failure(b.fleet.nodes["n1"].backend)
    a.sync()
    b.sync()
    for shared in pair:
        assert names(shared) == ["n2"]
        assert shared.fleet.nodes["n1"].ejections == 1


def test_a_worker_started_later_takes_the_fleet_as_it_is_not_as_configured(tmp_path: Path) -> None:
    a = worker(tmp_path)
    a.fleet.remove("n1")
    late = worker(tmp_path)  # configured with n0..n2, as every worker is
    assert list(late.fleet.nodes) == ["n0", "n2"]
    a.close()
    late.close()


def test_statuses_and_rollbacks_are_shared(pair: tuple[SharedFleet, SharedFleet]) -> None:
    a, b = pair
    member = a.fleet.nodes["n0"]
    member.record_status({"version": "1.2", "time": 1.0, "cpu_seconds": 0.5})
    member.last_seen = 123.0
    a.statuses(list(a.fleet.nodes.values()), {})
    a.rollbacks["digits"] = {"n0": "2", "n1": None}
    b.sync()
    assert b.fleet.nodes["n0"].status == {"version": "1.2", "time": 1.0, "cpu_seconds": 0.5}
    assert b.fleet.nodes["n0"].last_seen == 123.0
    assert dict(b.rollbacks) == {"digits": {"n0": "2", "n1": None}}
    b.rollbacks.pop("digits")
    assert "digits" not in a.rollbacks


def test_one_worker_leads_until_it_is_gone(tmp_path: Path) -> None:
    a, b = worker(tmp_path), worker(tmp_path)
    assert a.lead()
    assert not b.lead()
    assert a.lead()  # it keeps the lead
    a.close()  # (as the kernel does when that process dies)
    assert b.lead()
    b.close()


async def test_fleet_changes_run_one_at_a_time_across_workers(pair: tuple[SharedFleet, SharedFleet]) -> None:
    a, b = pair
    order: list[str] = []

    async def change(lock: object, name: str) -> None:
        async with lock:  # type: ignore[attr-defined]
            order.append(f"{name} in")
            await asyncio.sleep(0.1)
            order.append(f"{name} out")

    await asyncio.gather(change(a.changes_lock(), "a"), change(b.changes_lock(), "b"))
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


def relayed(shared: SharedFleet, node: str, tries: int, seconds: float, in_flight: int = 0) -> None:
    """What one worker relayed to `node`: `tries` answers of `seconds` each, in the last minute, and
    `in_flight` requests there now."""
    member = shared.fleet.nodes[node]
    now = shared.fleet.clock()
    for n in range(tries):
        member.traffic.add(now - 50 + n * 50 / tries, seconds, failed=n == 0)
    for _ in range(in_flight):
        member.backend.acquire()


def test_every_worker_shows_the_traffic_all_workers_relayed(pair: tuple[SharedFleet, SharedFleet]) -> None:
    a, b = pair
    relayed(a, "n0", 100, 0.010, in_flight=1)
    relayed(b, "n0", 300, 0.030, in_flight=2)
    relayed(b, "n1", 60, 0.005)
    alone = a.fleet.view()[0]["traffic"]
    assert alone["requests_per_s"] == round(100 / 60, 3)  # not told yet: its own share only
    a.publish()
    b.publish()
    for shared in pair:
        n0, n1, n2 = shared.fleet.view()
        assert n0["traffic"]["requests_per_s"] == round(400 / 60, 3)
        assert n0["traffic"]["errors_per_s"] == round(2 / 60, 3)
        assert n0["traffic"]["p50_ms"] == pytest.approx(30.0, rel=0.022)  # 300 of the 400 took 30 ms
        assert n0["traffic"]["p99_ms"] == pytest.approx(30.0, rel=0.022)
        assert n0["in_flight"] == 3
        assert n1["traffic"]["requests_per_s"] == 1.0
        assert n1["traffic"]["p50_ms"] == pytest.approx(5.0, rel=0.022)
        assert (n2["traffic"]["requests_per_s"], n2["traffic"]["p50_ms"], n2["in_flight"]) == (0, None, 0)
        assert [node["in_flight"] for node in shared.fleet.snapshot()] == [3, 0, 0]  # GET /gateway/nodes


def test_a_worker_that_stopped_telling_is_left_out(pair: tuple[SharedFleet, SharedFleet]) -> None:
    a, b = pair
    relayed(a, "n0", 120, 0.010)
    a.publish()
    assert b.fleet.view()[0]["traffic"]["requests_per_s"] == 2.0
    b.fleet.clock = lambda: time.monotonic() + SHARE_STALE_S + 1  # a said nothing since
    assert b.fleet.view()[0]["traffic"]["requests_per_s"] == 0
    b.publish()  # and its share goes
    assert b._db.execute("SELECT count(*) FROM traffic WHERE worker = ?", (a.worker,)).fetchone() == (0,)


def test_the_leaders_history_is_every_workers_and_outlives_its_lead(
    pair: tuple[SharedFleet, SharedFleet],
) -> None:
    a, b = pair
    history_s = a.fleet.health.history_s
    relayed(a, "n0", 60, 0.010)
    relayed(b, "n0", 60, 0.020)
    a.publish()
    b.publish()
    members = list(a.fleet.nodes.values())
    a.statuses(members, a.fleet.sample(1_000.0))  # a leads
    b.statuses(members, b.fleet.sample(1_005.0))  # a died; b leads on
    for shared in pair:
        history = shared.history(0.0)
        assert list(history) == ["n0", "n1", "n2"]
        assert [(p[0], p[1]) for p in history["n0"]] == [(1_000.0, 2.0), (1_005.0, 2.0)]
        assert history["n1"] == [[1_000.0, 0.0, None, None, 0.0], [1_005.0, 0.0, None, None, 0.0]]
        assert [p[0] for p in shared.history(1_000.0)["n0"]] == [1_005.0]  # after `since`
    b.statuses(members, b.fleet.sample(1_000.0 + history_s + 1))
    assert [p[0] for p in a.history(0.0)["n0"]] == [
        1_005.0,
        1_000.0 + history_s + 1,
    ]  # older than history_s: gone


ALERTS = AlertSettings(window_s=3, baseline_s=30, evaluate_s=0.2, min_requests=10)
OPERATOR = Principal("ops", "operator")


def analysis(directory: Path, clock: list[float]) -> FleetLogs:
    """A worker's side of the fleet's logs: the one store, and its own analysis."""
    return FleetLogs(
        LogStore(directory / "fleet.sqlite"), Analyzer(ALERTS, lambda: clock[0]), LogStoreSettings()
    )


def shipped(status: int, at: float, count: int, first: int = 1) -> bytes:
    line = {"ts": timestamp(at), "level": "info", "logger": "edgegen.access", "msg": "request", "ms": 4.0}
    entries = [[first + n, {**line, "status": status, "model": "digits"}] for n in range(count)]
    return orjson.dumps({"node": "n0", "spool": "s1", "entries": entries})


async def test_the_leader_analyses_every_workers_lines_and_its_alerts_outlive_its_lead(
    tmp_path: Path, pair: tuple[SharedFleet, SharedFleet]
) -> None:
    """Nodes ship to whichever worker their connection reached: a spike split over two workers, each
    with fewer lines than an alert needs, is one alert, raised once; a new leader keeps it active without
    raising it again, and resolves it when it is over."""
    a, b = pair
    clock = [time.time()]
    logs_a, logs_b = analysis(tmp_path, clock), analysis(tmp_path, clock)
    assert await logs_a.receive(shipped(503, clock[0] - 1, 6), OPERATOR) == {"stored": 6}
    assert await logs_b.receive(shipped(503, clock[0] - 1, 6, first=7), OPERATOR) == {"stored": 6}
    await logs_a.analyse()  # a leads: the lines b kept are read too
    [raised] = logs_a.analyzer.evaluate()
    assert (raised.kind, raised.node, raised.detail["requests"]) == ("error_spike", "n0", 12)
    a.keep_alerts(logs_a.analyzer.board())
    for shared in pair:  # every worker shows the leader's alerts
        active, recent = shared.alerts()
        assert [(x["kind"], x["since"]) for x in active] == [("error_spike", raised.since)]
        assert recent == active

    logs_b.analyzer.resume(b.alerts())  # a died; b leads from here, from what a left
    await logs_b.analyse()  # the analysis' whole span read back from the store
    assert logs_b.analyzer.evaluate() == []  # active already: not raised a second time
    assert list(logs_b.analyzer.active) == [("error_spike", "n0", "digits")]
    clock[0] += 4  # the spike is out of the window
    await logs_b.receive(shipped(200, clock[0] - 1, 12, first=13), OPERATOR)
    await logs_b.analyse()
    assert logs_b.analyzer.evaluate() == []
    b.keep_alerts(logs_b.analyzer.board())
    active, [resolved] = a.alerts()
    assert active == []
    assert (resolved["since"], resolved["resolved"]) == (raised.since, clock[0])
    for logs in (logs_a, logs_b):
        logs.close()


def test_a_routes_thread_reads_the_shared_history_and_view_while_nodes_come_and_go(tmp_path: Path) -> None:
    """`GET /gateway/fleet/history` and `/gateway/fleet` run in a thread; the loop adds and removes nodes
    (an admin call, another worker's change taken). Iterating the nodes as they changed raised there."""
    shared = worker(tmp_path, nodes=20)

    def write() -> None:
        for i in range(400):
            shared.fleet.add(NodeEntry(url=f"http://127.0.0.2:{9000 + i}", name=f"extra{i}"))
            shared.fleet.remove(f"extra{i}")

    def read() -> None:
        shared.history(0.0)
        shared.fleet.view()

    try:
        assert read_while_written(read, write) == []
    finally:
        shared.close()
