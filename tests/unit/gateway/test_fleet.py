"""Which nodes take traffic: active checks, passive ejection (with its cap), drain; on a test clock."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from edgegen.errors import ConfigError
from edgegen.gateway.fleet import (
    RECENT_TRIES,
    WINDOW_S,
    Fleet,
    FleetMember,
    Traffic,
    bucket,
    merged_view,
)
from edgegen.gateway.settings import GatewaySettings, HealthSettings, NodeEntry, OutlierSettings
from tests.threaded import read_while_written


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(n: int = 3, **outlier: float) -> tuple[Fleet, Clock]:
    clock = Clock()
    fleet = Fleet(HealthSettings(unhealthy_after=2, healthy_after=2), OutlierSettings(**outlier), clock=clock)
    for i in range(n):
        fleet.add(NodeEntry(url=f"http://127.0.0.1:{9000 + i}"))
    return fleet, clock


def names(fleet: Fleet) -> list[str]:
    return [b.name for b in fleet.available()]


def test_consecutive_failures_eject_for_a_time_that_doubles() -> None:
    fleet, clock = make(consecutive_failures=3, base_ejection_s=5)
    node = fleet.nodes["node-1"].backend
    for _ in range(2):
        fleet.record_failure(node)
    fleet.record_success(node)  # a success resets the count
    for _ in range(2):
        fleet.record_failure(node)
    assert "node-1" in names(fleet)
    fleet.record_failure(node)
    assert names(fleet) == ["node-2", "node-3"]
    clock.now += 5
    assert "node-1" in names(fleet)  # back when the ejection runs out, without any event
    for _ in range(3):
        fleet.record_failure(node)
    clock.now += 5
    assert "node-1" not in names(fleet)  # second ejection: 10 s
    clock.now += 5
    assert "node-1" in names(fleet)
    assert fleet.nodes["node-1"].ejections == 2


def test_never_more_than_the_allowed_share_is_ejected() -> None:
    fleet, _ = make(consecutive_failures=1, max_ejected_share=0.5)
    for name in ("node-1", "node-2", "node-3"):
        fleet.record_failure(fleet.nodes[name].backend)
    assert names(fleet) == ["node-2", "node-3"]  # one of three: a second would pass half the fleet


def test_active_checks_take_a_node_out_and_bring_it_back() -> None:
    fleet, _ = make()
    fleet.record_check("node-2", ok=False)
    assert "node-2" in names(fleet)  # one failure is not enough
    fleet.record_check("node-2", ok=False)
    assert "node-2" not in names(fleet)
    fleet.record_check("node-2", ok=True)
    assert "node-2" not in names(fleet)
    fleet.record_check("node-2", ok=True)
    assert "node-2" in names(fleet)
    fleet.record_check("gone", ok=False)  # a node removed while its check ran: ignored


def test_a_draining_node_takes_no_new_requests() -> None:
    fleet, _ = make()
    fleet.set_draining("node-3", True)
    assert names(fleet) == ["node-1", "node-2"]
    fleet.set_draining("node-3", False)
    fleet.set_weight("node-3", 5)
    assert fleet.available()[-1].weight == 5


def test_membership_changes() -> None:
    fleet, _ = make(2)
    fleet.add(NodeEntry(url="http://127.0.0.1:9100", name="edge-a"))
    assert names(fleet) == ["node-1", "node-2", "edge-a"]
    with pytest.raises(ConfigError, match="already in the fleet"):
        fleet.add(NodeEntry(url="http://127.0.0.1:9100"))
    with pytest.raises(ConfigError, match="already in the fleet"):
        fleet.add(NodeEntry(url="http://127.0.0.1:9101", name="edge-a"))
    fleet.remove("node-1")
    assert names(fleet) == ["node-2", "edge-a"]
    assert fleet.add(NodeEntry(url="http://127.0.0.1:9102")).backend.name == "node-3"


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([{"url": "127.0.0.1:8001"}], "http"),
        ([{"url": "http://a:1/path"}], "without path"),
        ([{"url": "http://a:1?x=1"}], "without path"),
        ([{"url": "http://a:1"}, {"url": "http://a:1"}], "unique"),
        ([{"url": "http://a:1", "weight": 0}], "weight"),
    ],
)
def test_bad_node_entries_are_refused(nodes: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewaySettings(nodes=nodes)  # type: ignore[arg-type]


def test_the_traffic_history_keeps_history_s_of_samples() -> None:
    clock = Clock()
    fleet = Fleet(HealthSettings(status_interval_s=5, history_s=20), OutlierSettings(), clock=clock)
    state = fleet.add(NodeEntry(url="http://127.0.0.1:9000"))
    for second in range(10):
        state.traffic.add(clock.now, 0.010 if second % 2 else 0.030, failed=second == 9)
        state.sample(1_000.0 + second, clock.now)
        clock.now += 5
    assert len(state.history) == 4  # 20 s of samples 5 s apart
    t, rps, p50, p99, errors = state.history[-1]
    assert t == 1_009.0
    assert rps > 0
    assert p50 is not None
    assert p99 == pytest.approx(30.0, rel=0.022)  # (a bucket's middle: merged_view)
    assert errors > 0


def weighed_quantile(samples: list[tuple[float, float]], q: float) -> float:
    """The nearest-rank quantile of (value, weight) pairs."""
    ordered = sorted(samples)
    total, seen = sum(w for _, w in ordered), 0.0
    for value, weight in ordered:
        seen += weight
        if seen >= q * total * (1 - 1e-9):
            return value
    raise AssertionError("no samples")


def test_a_view_merged_from_workers_shares_sums_their_rates_and_finds_quantiles_within_a_bucket() -> None:
    """A busy worker's tries fill its deque within 10 s; a quiet one's span the whole window. Merged, each
    worker's latencies count by its rate, as they would in one worker that relayed both streams."""
    rng, now = random.Random(7), 1_000.0
    busy, quiet = Traffic(), Traffic()
    for n in range(3000):
        busy.add(now - 10 + n / 300, rng.lognormvariate(math.log(0.02), 0.5), failed=n % 100 == 0)
    for n in range(300):
        quiet.add(now - 59 + n * 59 / 300, rng.lognormvariate(math.log(0.05), 0.3), failed=n % 50 == 0)
    merged = merged_view([busy.share(now), quiet.share(now)])
    spans = busy.share(now)["span_s"], quiet.share(now)["span_s"]
    assert spans == (pytest.approx(10 * 2048 / 3000, abs=0.01), 60.0)  # the busy one's deque: 6.8 s
    within = [[(s, f) for t, s, f in w.tries if now - t <= 60] for w in (busy, quiet)]
    rates = sum(len(tries) / span for tries, span in zip(within, spans, strict=True))
    errors = sum(sum(f for _, f in tries) / span for tries, span in zip(within, spans, strict=True))
    assert merged["requests_per_s"] == pytest.approx(rates, abs=0.002)
    assert merged["errors_per_s"] == pytest.approx(errors, abs=0.002)
    samples = [(s, 1 / span) for tries, span in zip(within, spans, strict=True) for s, _ in tries]
    for q, key in ((0.5, "p50_ms"), (0.99, "p99_ms")):
        assert merged[key] == pytest.approx(weighed_quantile(samples, q) * 1000, rel=0.022), key
    alone = merged_view([quiet.share(now)])
    quiet_p99 = weighed_quantile([(s, 1.0) for s, _ in within[1]], 0.99)
    assert alone["p99_ms"] == pytest.approx(quiet_p99 * 1000, rel=0.022)
    assert merged_view([Traffic().share(now)])["p50_ms"] is None


def test_a_share_counted_as_tries_come_is_the_one_counted_from_all_of_them() -> None:
    """`share` counts only the tries added since the last (a worker shares every half second, and a busy
    node's 2,048 tries were all counted again each time); what it tells stays what the window holds: the
    deque's last RECENT_TRIES tries, those older than WINDOW_S let go, failures among them."""
    rng, traffic, now = random.Random(11), Traffic(), 1_000.0
    for step in range(400):
        for _ in range(rng.choice((0, 1, 5, 40, 900, 2_500))):  # quiet spells, bursts past the deque's length
            now += rng.uniform(0.0, 0.02)
            traffic.add(now, rng.lognormvariate(math.log(0.02), 0.6), failed=rng.random() < 0.05)
        now += rng.choice((0.1, 0.5, 7.0, 61.0))
        recent = [(s, f) for t, s, f in traffic.tries if now - t <= WINDOW_S]
        expected = Counter(bucket(s) for s, _ in recent)
        shared = traffic.share(now)
        assert shared["buckets"] == dict(expected), step
        assert (shared["requests"], shared["errors"]) == (len(recent), sum(f for _, f in recent)), step
        full = len(traffic.tries) == RECENT_TRIES
        span = max(min(WINDOW_S, now - traffic.tries[0][0]) if full else WINDOW_S, 1e-3)
        assert shared["span_s"] == span, step


def test_the_fleet_is_read_whole_from_a_route_thread_while_the_loop_records_its_traffic() -> None:
    """`GET /gateway/fleet`, its history and `/metrics` are sync routes: they read the fleet from a thread
    while the event loop records tries and samples points. Iterating a deque or a dict the loop changes
    meanwhile raised RuntimeError there (a 500 under traffic)."""
    fleet, clock = make(3)
    backends = [m.backend for m in fleet.nodes.values()]

    def read() -> None:
        fleet.view()
        fleet.history(0.0)
        fleet.in_flight()

    def write() -> None:
        for i in range(60_000):
            clock.now += 0.001
            fleet.record_try(backends[i % 3], 0.01, failed=False)
            if i % 500 == 0:
                fleet.sample(clock.now)

    assert read_while_written(read, write) == []
    assert [len(points) for points in fleet.history(0.0).values()] == [120] * 3


def test_who_takes_traffic_decided_in_a_routes_thread_never_outlives_a_change_on_the_loop() -> None:
    """`/v2/health/ready` and `/metrics` ask the fleet who takes traffic from a thread. Here the loop drains
    node-1 while such a decision is being made, after it read node-1 and before it was kept (the thread
    switch, made to happen there): kept, it would send requests to the drained node until the next
    change. It is made again instead."""
    fleet, _ = make(3)
    fleet.available()

    class Interrupted(FleetMember):
        """node-3, whose reading is where the loop's change lands."""

        armed = False

        @property  # type: ignore[override]
        def ejected_until(self) -> float:
            if Interrupted.armed:
                Interrupted.armed = False
                fleet.set_draining("node-1", True)  # the loop, between two steps of the thread
            return float(self.__dict__["ejected_until"])

        @ejected_until.setter
        def ejected_until(self, value: float) -> None:
            self.__dict__["ejected_until"] = value

    fleet.nodes["node-3"].__class__ = Interrupted
    fleet.set_weight("node-3", 1)  # a change: the next question decides again
    Interrupted.armed = True
    fleet.available()  # the decision the drain overtakes
    assert names(fleet) == ["node-2", "node-3"]
