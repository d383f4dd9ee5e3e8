"""The analysis of shipped access lines: spikes and regressions raised once, resolved, per node and model."""

from __future__ import annotations

from typing import Any

from edgegen.gateway.alerts import RECENT_ALERTS, Analyzer
from edgegen.gateway.settings import AlertSettings
from tests.threaded import read_while_written
from tests.unit.cache.test_tiers import Clock

SETTINGS = AlertSettings(window_s=60, baseline_s=600, min_requests=20)


def access(
    t: float, status: int = 200, ms: float = 10.0, node: str = "n1", model: str = "m"
) -> dict[str, Any]:
    return {"logger": "edgegen.access", "status": status, "ms": ms, "model": model, "node": node, "time": t}


def traffic(clock: Clock, seconds: int, per_s: int, **kw: Any) -> list[dict[str, Any]]:
    start = clock.now
    lines = [access(start + s + i / per_s, **kw) for s in range(seconds) for i in range(per_s)]
    clock.now = start + seconds
    return lines


def test_an_error_spike_is_raised_once_and_resolved() -> None:
    clock = Clock()
    analyzer = Analyzer(SETTINGS, clock=clock)
    analyzer.observe(traffic(clock, 300, 2))  # five quiet minutes
    assert analyzer.evaluate() == []
    analyzer.observe(traffic(clock, 30, 2, status=503))
    found = analyzer.evaluate()
    assert [(a.kind, a.node, a.model) for a in found] == [("error_spike", "n1", "m")]
    assert found[0].detail["error_rate"] > 0.3
    assert found[0].detail["baseline_error_rate"] == 0
    assert analyzer.evaluate() == []  # raised once
    assert list(analyzer.active.values()) == found
    analyzer.observe(traffic(clock, 90, 2))  # healthy again
    analyzer.evaluate()
    assert analyzer.active == {}
    assert analyzer.recent[-1].resolved == clock.now


def test_a_latency_regression_per_model() -> None:
    clock = Clock()
    analyzer = Analyzer(SETTINGS, clock=clock)
    start = clock.now
    analyzer.observe([access(start + i, ms=10.0) for i in range(300)])
    analyzer.observe([access(start + 300 + i, ms=25.0) for i in range(40)])  # the last 40 s: slower
    analyzer.observe([access(start + i, ms=5.0, model="other") for i in range(340)])  # the same as ever
    clock.now = start + 340
    found = analyzer.evaluate()
    assert [(a.kind, a.model) for a in found] == [("latency_regression", "m")]
    assert found[0].detail["p50_ms"] == 25.0
    assert found[0].detail["baseline_p50_ms"] == 10.0


def test_nothing_is_raised_on_too_few_requests_or_errors_as_usual() -> None:
    clock = Clock()
    analyzer = Analyzer(SETTINGS, clock=clock)
    analyzer.observe(traffic(clock, 50, 1, status=500)[:19])
    assert analyzer.evaluate() == []
    other = Analyzer(SETTINGS, clock=clock)  # a node that always fails 10 %: its normal, not a spike
    lines = traffic(clock, 600, 2)
    for line in lines[::10]:
        line["status"] = 500
    other.observe(lines)
    assert other.evaluate() == []


def test_late_and_foreign_lines() -> None:
    clock = Clock()
    analyzer = Analyzer(SETTINGS, clock=clock)
    analyzer.observe([access(clock.now - 3600, status=500) for _ in range(100)])  # spooled an hour ago
    analyzer.observe([{"logger": "edgegen.node", "msg": "x", "node": "n1", "time": clock.now}] * 50)
    analyzer.observe([{**access(clock.now), "status": "500"}] * 50)
    assert analyzer.evaluate() == []


def test_the_comparison_only_finds_and_the_alerts_change_when_settled() -> None:
    """`compare` (run in a worker thread) reads the counts and leaves the alerts alone; `settle` (on the
    event loop) raises what it found, and resolves an alert whose node and model went quiet for the span."""
    clock = Clock()
    analyzer = Analyzer(SETTINGS, clock=clock)
    analyzer.observe(traffic(clock, 300, 2))
    analyzer.observe(traffic(clock, 30, 2, status=503))
    findings = analyzer.compare(clock.now)
    assert findings["error_spike", "n1", "m"] is not None
    assert findings["latency_regression", "n1", "m"] is None
    assert analyzer.active == {}
    assert analyzer.changes == 0
    raised = analyzer.settle(findings, clock.now)
    assert [(a.kind, a.node, a.model, a.since) for a in raised] == [("error_spike", "n1", "m", clock.now)]
    clock.now += SETTINGS.window_s + SETTINGS.baseline_s + 60  # nothing since: its buckets age out
    later = analyzer.compare(clock.now)
    assert later == {("error_spike", "n1", "m"): None, ("latency_regression", "n1", "m"): None}
    assert analyzer.settle(later, clock.now) == []
    assert analyzer.active == {}
    assert analyzer.recent[-1].resolved == clock.now
    assert analyzer.compare(clock.now) == {}  # its series is gone


def test_an_alert_taken_over_from_a_leader_is_resolved_when_its_node_sent_nothing_here() -> None:
    clock = Clock()
    left = Analyzer(SETTINGS, clock=clock)
    left.observe(traffic(clock, 300, 2, node="n9"))
    left.observe(traffic(clock, 30, 2, status=503, node="n9"))
    assert [a.node for a in left.evaluate()] == ["n9"]
    analyzer = Analyzer(SETTINGS, clock=clock)
    analyzer.resume(left.board())
    assert analyzer.settle(analyzer.compare(clock.now), clock.now) == []
    assert analyzer.active == {}
    assert analyzer.recent[-1].resolved == clock.now


def test_the_board_is_read_whole_from_a_route_thread_while_alerts_are_raised_and_resolved() -> None:
    """`GET /gateway/alerts` and `/metrics` read the board from a thread while the loop settles the
    analysis' findings: iterating the alerts as they changed raised RuntimeError there."""
    clock = Clock()
    analyzer = Analyzer(SETTINGS, clock=clock)
    spike = {"error_rate": 0.5, "baseline_error_rate": 0.0, "requests": 40.0}

    def write() -> None:
        for i in range(20_000):
            clock.now += 1
            node = f"n{i % 7}"
            found = {("error_spike", node, "m"): spike if i % 2 else None}
            analyzer.settle(found, clock.now)

    assert read_while_written(analyzer.board, write) == []
    assert len(analyzer.board()[1]) == RECENT_ALERTS
