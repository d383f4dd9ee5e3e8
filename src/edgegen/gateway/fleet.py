"""The fleet: every node the gateway knows, and which of them may take traffic now.

A node takes traffic when it is healthy (active checks), not draining, and not ejected (passive
outlier detection). Both verdicts are kept apart, as Envoy keeps them:

    active   GET /v2/health/ready every `interval_s`; `unhealthy_after` failures in a row take the node
             out, `healthy_after` passes bring it back
    passive  `consecutive_failures` failed requests in a row eject the node for base × 2^(n-1)
             seconds (n: its ejections so far, capped at `max_ejection_s`); never more than
             `max_ejected_share` of the fleet at once. Failed means the node failed — no answer
             (connect error, timeout, dropped connection) or 502/504 — never an answer such as a
             500 that one request's content caused (the proxy decides: gateway/proxy.py), so a
             client cannot eject nodes by repeating a bad input

`available()` is cached and rebuilt only when a verdict changes or an ejection runs out, so a pick
over a large fleet does not rescan it. The clock is injectable for tests.

With several gateway workers (shared.py) a `listener` is told of every change this worker makes —
membership, weight, draining, a health verdict, an ejection — and `apply` takes the changes others made.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgegen.errors import ConfigError
from edgegen.gateway.balancers import Backend
from edgegen.gateway.settings import HealthSettings, NodeEntry, OutlierSettings

log = logging.getLogger("edgegen.gateway")
RECENT_TRIES = 2048  # per node, for the fleet view's latency quantiles and rates
WINDOW_S = 60.0  # the fleet view's rates and quantiles cover this much of the recent past
MAX_HISTORY_POINTS = 100_000  # per node, whatever history_s and status_interval_s ask
# A latency's bucket in what a worker tells the others (`Share`): 16 to each doubling, so a quantile of
# several workers' tries is given within 2.2 % (the bucket's geometric middle).
STEPS_PER_DOUBLING = 16
# What one worker of several tells the others of a node (shared.py): its tries within its own window —
# `span_s`, `requests`, `errors`, the latencies counted by bucket (`buckets`) — and its `in_flight`.
Share = dict[str, Any]
Point = tuple[float, float, float | None, float | None, float]  # (wall time, requests/s, p50, p99, errors/s)


def bucket(seconds: float) -> int:
    return math.floor(math.log2(max(seconds, 1e-6)) * STEPS_PER_DOUBLING)


@dataclass
class Traffic:
    """A node's recent tries at the gateway: (monotonic time, seconds, failed), newest last.

    What the fleet view shows of them, and what a worker of several tells the others (`share`, every
    `sync_s`), is kept counted as they come: each share counts the tries after the last one it counted and
    lets go of those past the window, so its cost follows the traffic, not the nodes times RECENT_TRIES
    (100 busy nodes: 66 ms of the event loop every half second, and as much a fleet view, when each
    counted all its tries again). The event loop adds tries; the fleet view asks for a share from a route's
    thread too (`GET /gateway/fleet`): the share works on a copy of the tries taken in one step (`list()`
    of a deque runs in C, never interleaved with the loop's appends), under a lock of its own."""

    tries: deque[tuple[float, float, bool]] = field(default_factory=lambda: deque(maxlen=RECENT_TRIES))
    _last: tuple[float, float, bool] | None = None  # the newest try `share` counted (by identity)
    _counted: deque[tuple[float, int, bool]] = field(default_factory=deque)  # (time, bucket, failed)
    _buckets: Counter[int] = field(default_factory=Counter)  # of the tries in `_counted`
    _failed: int = 0  # of the tries in `_counted`
    _sharing: threading.Lock = field(default_factory=threading.Lock)  # (the loop's and a route's shares)

    def add(self, now: float, seconds: float, failed: bool) -> None:
        self.tries.append((now, seconds, failed))

    @staticmethod
    def _span(tries: list[tuple[float, float, bool]], now: float) -> float:
        # A busy node fills the deque in less than the window: its rates are over the span it covers.
        full = len(tries) == RECENT_TRIES
        return max(min(WINDOW_S, now - tries[0][0]) if full else WINDOW_S, 1e-3)

    def share(self, now: float) -> Share:
        """The tries within the window, as a worker tells the others (`Share`, less `in_flight`), at `now`
        (the monotonic clock; a try that a later `now` let go of stays gone)."""
        with self._sharing:
            tries = list(self.tries)
            start = 0  # where the tries not counted yet begin: after the last counted, if still there
            for index in range(len(tries) - 1, -1, -1):
                if tries[index] is self._last:
                    start = index + 1
                    break
            counted, buckets = self._counted, self._buckets
            for t, seconds, failed in itertools.islice(tries, start, None):
                key = bucket(seconds)
                counted.append((t, key, failed))
                buckets[key] += 1
                self._failed += failed
            if tries:
                self._last = tries[-1]
            while counted and (len(counted) > RECENT_TRIES or now - counted[0][0] > WINDOW_S):
                _, key, failed = counted.popleft()
                self._failed -= failed
                buckets[key] -= 1
                if not buckets[key]:
                    del buckets[key]
            return {"span_s": self._span(tries, now), "requests": len(counted), "errors": self._failed,
                    "buckets": dict(buckets)}  # fmt: skip


def merged_view(shares: list[Share]) -> dict[str, Any]:
    """A node's traffic over the shares of one worker or several (window_s, requests_per_s, errors_per_s,
    p50_ms, p99_ms): their rates summed, p50 and p99 over their latencies merged by bucket — each worker's
    counts weighed by its rate, since a busier worker's tries cover a shorter span — and given as the
    bucket's middle (within 2.2 %)."""
    rates: Counter[int] = Counter()
    requests = errors = 0.0
    for share in shares:
        span = share["span_s"]
        requests, errors = requests + share["requests"] / span, errors + share["errors"] / span
        for key, count in share["buckets"].items():
            rates[int(key)] += count / span  # (JSON keys are strings)
    ordered = sorted(rates.items())
    total = sum(rates.values())

    def quantile(q: float) -> float | None:
        wanted, seen = q * total * (1 - 1e-9), 0.0  # (the nearest rank; sums of floats)
        for key, rate in ordered:
            seen += rate
            if seen >= wanted:
                return round(2 ** ((key + 0.5) / STEPS_PER_DOUBLING) * 1000, 3)
        return None  # (no tries)

    return {
        "window_s": round(max((s["span_s"] for s in shares), default=WINDOW_S), 3),
        "requests_per_s": round(requests, 3),
        "errors_per_s": round(errors, 3),
        "p50_ms": quantile(0.5),
        "p99_ms": quantile(0.99),
    }


class FleetListener(Protocol):
    """Who hears of this worker's changes to the fleet (shared.py)."""

    def changed(self, member: FleetMember, *, new: bool = False) -> None:
        """A member's weight, draining or verdicts changed, or (`new`) it joined; ConfigError when a new
        member's name or URL is taken already (another worker added it)."""

    def removed(self, name: str) -> None: ...


@dataclass(eq=False)
class FleetMember:
    """One node as the gateway sees it: its routing verdicts, its last status, its traffic here."""

    backend: Backend
    healthy: bool = True  # optimistic at start; the first check runs at once
    draining: bool = False
    passes: int = 0
    fails: int = 0
    consecutive_errors: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    last_seen: float | None = None  # wall-clock time of its last passed check
    status: dict[str, Any] | None = None  # its last GET /admin/status
    status_error: str | None = None
    cpu_cores: float | None = None  # CPU time per second between its last two statuses
    traffic: Traffic = field(default_factory=Traffic)
    # (wall-clock time, requests/s, p50 ms, p99 ms, errors/s) of its traffic, sampled by the status loop
    history: deque[Point] = field(default_factory=deque)

    def share(self, now: float) -> Share:
        return {**self.traffic.share(now), "in_flight": self.backend.in_flight}

    def in_flight(self, others: list[Share] | None = None) -> int:
        """Requests at the node from this worker now, and from the `others` as they last told."""
        return self.backend.in_flight + sum(int(share["in_flight"]) for share in others or ())

    def traffic_view(self, now: float, others: list[Share] | None = None) -> dict[str, Any]:
        """Its traffic as this worker relayed it, or (`others`: what the other workers of several told of
        it) as all of them did: the same view either way (`merged_view`)."""
        return merged_view([self.share(now), *(others or ())])

    def sample(self, wall: float, now: float, others: list[Share] | None = None) -> Point:
        view = self.traffic_view(now, others)
        point = (round(wall, 3), view["requests_per_s"], view["p50_ms"], view["p99_ms"], view["errors_per_s"])
        self.history.append(point)
        return point

    def record_status(self, status: dict[str, Any]) -> None:
        previous = self.status
        if previous is not None and "cpu_seconds" in status and "cpu_seconds" in previous:
            elapsed = float(status["time"]) - float(previous["time"])
            if elapsed > 0:
                self.cpu_cores = round(
                    (float(status["cpu_seconds"]) - float(previous["cpu_seconds"])) / elapsed, 3
                )
        self.status, self.status_error = status, None

    def view(self, now: float, wall: float, others: list[Share] | None = None) -> dict[str, Any]:
        """The fleet view of this node: routing state, load, version, recent traffic as the gateway saw it
        (with `others`, every worker's: its traffic and requests in flight)."""
        status = self.status or {}
        return {
            **self.describe(now, others),
            "last_seen_s": round(wall - self.last_seen, 3) if self.last_seen is not None else None,
            "version": status.get("version"),
            "models": status.get("models"),
            "ready": status.get("ready"),
            "uptime_s": status.get("uptime_s"),
            "load": {
                "in_flight": status.get("in_flight"),
                "cpu_cores": self.cpu_cores,
                "cpus": status.get("cpus"),
                "rss_bytes": status.get("rss_bytes"),
                "load_average": status.get("load_average"),
            },
            "jobs": status.get("jobs"),
            "cache": status.get("cache"),
            "status_error": self.status_error,
            "traffic": self.traffic_view(now, others),
        }

    def describe(self, now: float, others: list[Share] | None = None) -> dict[str, object]:
        """Its routing state and requests in flight (with `others`, every worker's)."""
        b = self.backend
        return {
            "name": b.name,
            "url": b.url,
            "weight": b.weight,
            "healthy": self.healthy,
            "draining": self.draining,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3),
            "ejections": self.ejections,
            "in_flight": self.in_flight(others),
            "latency_ewma_ms": round(b.ewma_s * 1000, 3),
        }


class Fleet:
    def __init__(
        self,
        health: HealthSettings,
        outlier: OutlierSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.health = health
        self.outlier = outlier
        self.clock = clock
        self.nodes: dict[str, FleetMember] = {}
        self._numbers = itertools.count(1)
        self._changes = 0  # moved by every change of who may take traffic
        # Who takes traffic, as last decided: (`_changes` when it was decided, until when it holds, who).
        self._decided: tuple[int, float, list[Backend]] = (-1, math.inf, [])
        self.listener: FleetListener | None = None
        # With several workers (shared.py): what the others told of each node's traffic, by name.
        self.others: Callable[[], dict[str, list[Share]]] | None = None

    # -- membership ------------------------------------------------------------------------------------
    def add(self, entry: NodeEntry) -> FleetMember:
        if any(state.backend.url == entry.url for state in self.nodes.values()):
            raise ConfigError(f"a node with URL {entry.url} is already in the fleet")
        if entry.name is not None and entry.name in self.nodes:
            raise ConfigError(f"a node named {entry.name!r} is already in the fleet")
        name = entry.name
        while name is None or name in self.nodes:  # node-1, node-2, … skipping names taken
            name = f"node-{next(self._numbers)}"
        state = FleetMember(Backend(name=name, url=entry.url, weight=entry.weight))
        points = math.ceil(self.health.history_s / self.health.status_interval_s)
        state.history = deque(maxlen=min(points, MAX_HISTORY_POINTS))
        self.nodes[name] = state
        self._changed()
        if self.listener is not None:
            try:
                self.listener.changed(state, new=True)
            except ConfigError:
                del self.nodes[name]
                self._changed()
                raise
        return state

    def remove(self, name: str) -> FleetMember:
        state = self.nodes.pop(name)
        self._changed()
        if self.listener is not None:
            self.listener.removed(name)
        return state

    def set_weight(self, name: str, weight: int) -> None:
        self.nodes[name].backend.weight = weight
        self._changed(self.nodes[name])

    def set_draining(self, name: str, draining: bool) -> None:
        self.nodes[name].draining = draining
        self._changed(self.nodes[name])

    def apply(self, rows: list[dict[str, Any]]) -> list[FleetMember]:
        """Take the fleet as the workers left it (shared.py's rows, in the fleet's order): members, weights,
        verdicts, ejections, last statuses. Gives the members that left, for their pools to close. The
        listener hears nothing of it: this is where its changes come back from."""
        wanted = {row["name"] for row in rows}
        gone = [state for name, state in self.nodes.items() if name not in wanted]
        ordered: dict[str, FleetMember] = {}
        for row in rows:
            name = row["name"]
            state = self.nodes.get(name)
            if state is None or state.backend.url != row["url"]:
                if state is not None:
                    gone.append(state)
                state = FleetMember(Backend(name=name, url=row["url"]))
                points = math.ceil(self.health.history_s / self.health.status_interval_s)
                state.history = deque(maxlen=min(points, MAX_HISTORY_POINTS))
            state.backend.weight = row["weight"]
            state.draining, state.healthy = bool(row["draining"]), bool(row["healthy"])
            state.ejections, state.ejected_until = row["ejections"], row["ejected_until"]
            state.last_seen, state.status_error = row["last_seen"], row["status_error"]
            if row["status"] is not None and row["status"] != state.status:
                state.record_status(row["status"])
            ordered[name] = state
        self.nodes = ordered
        self._changed()
        return gone

    # -- who may take traffic ------------------------------------------------------------------------------
    def available(self) -> list[Backend]:
        """The nodes that take traffic now: the same list until that changes (balancers rebuild on a new
        one). Asked on the loop and from sync routes' threads: a decision is kept with the count of changes
        it was made after, in one assignment, so one that a change on the loop overtook (made in a thread
        before it, kept after it) is decided again, never served."""
        changes, until, nodes = self._decided
        if changes == self._changes and self.clock() < until:
            return nodes
        changes, now, members = self._changes, self.clock(), list(self.nodes.values())
        nodes = [s.backend for s in members if s.healthy and not s.draining and s.ejected_until <= now]
        pending = [s.ejected_until for s in members if s.ejected_until > now]
        self._decided = (changes, min(pending, default=math.inf), nodes)
        return nodes

    def _changed(self, member: FleetMember | None = None) -> None:
        """Who takes traffic is to be decided again; `member`'s change is told to the listener."""
        self._changes += 1
        if member is not None and self.listener is not None:
            self.listener.changed(member)

    # -- active checks ---------------------------------------------------------------------------------------
    def record_check(self, name: str, ok: bool) -> None:
        state = self.nodes.get(name)
        if state is None:
            return  # removed while its check was in flight
        if ok:
            state.passes, state.fails = state.passes + 1, 0
            state.last_seen = time.time()
            if not state.healthy and state.passes >= self.health.healthy_after:
                state.healthy = True
                log.info("node healthy again", extra={"node": name})
                self._changed(state)
        else:
            state.fails, state.passes = state.fails + 1, 0
            if state.healthy and state.fails >= self.health.unhealthy_after:
                state.healthy = False
                log.warning("node failed its health checks", extra={"node": name})
                self._changed(state)

    # -- passive outlier detection ---------------------------------------------------------------------------
    def record_success(self, backend: Backend) -> None:
        state = self.nodes.get(backend.name)
        if state is not None:
            state.consecutive_errors = 0

    def record_failure(self, backend: Backend) -> None:
        state = self.nodes.get(backend.name)
        if state is None:
            return
        state.consecutive_errors += 1
        if state.consecutive_errors < self.outlier.consecutive_failures:
            return
        now = self.clock()
        if state.ejected_until > now:
            return
        ejected = sum(1 for s in self.nodes.values() if s.ejected_until > now)
        if ejected + 1 > self.outlier.max_ejected_share * len(self.nodes):
            log.warning(
                "node failing but not ejected: too much of the fleet is out", extra={"node": backend.name}
            )
            return
        state.ejections += 1
        seconds = min(self.outlier.base_ejection_s * 2 ** (state.ejections - 1), self.outlier.max_ejection_s)
        state.ejected_until = now + seconds
        state.consecutive_errors = 0
        log.warning("node ejected", extra={"node": backend.name, "seconds": seconds})
        self._changed(state)

    def snapshot(self) -> list[dict[str, object]]:
        now, others = self.clock(), self._others()
        return [state.describe(now, _of(others, name)) for name, state in self.nodes.items()]

    def record_try(self, backend: Backend, seconds: float, failed: bool) -> None:
        state = self.nodes.get(backend.name)
        if state is not None:
            state.traffic.add(self.clock(), seconds, failed)

    # The readers below run on the event loop and in the threads of sync routes (`GET /gateway/fleet`, its
    # history, `/metrics`): each takes its copy of the nodes in one step (`list()` of a dict or a deque
    # runs in C), never iterating what the loop may change meanwhile (a node added, a point sampled).
    def view(self) -> list[dict[str, Any]]:
        now, wall, others = self.clock(), time.time(), self._others()
        return [state.view(now, wall, _of(others, name)) for name, state in list(self.nodes.items())]

    def history(self, since: float) -> dict[str, list[Point]]:
        """Each node's traffic history (this worker's points) after `since`, oldest first."""
        return {name: [p for p in list(m.history) if p[0] > since] for name, m in list(self.nodes.items())}

    def sample(self, wall: float) -> dict[str, Point]:
        """A point of each node's traffic history, as the fleet view shows it now."""
        now, others = self.clock(), self._others()
        return {name: state.sample(wall, now, _of(others, name)) for name, state in self.nodes.items()}

    def in_flight(self) -> dict[str, int]:
        """Each node's requests in flight from this gateway (with several workers, from all of them)."""
        others = self._others()
        return {name: state.in_flight(_of(others, name)) for name, state in list(self.nodes.items())}

    def _others(self) -> dict[str, list[Share]] | None:
        return self.others() if self.others is not None else None


def _of(others: dict[str, list[Share]] | None, name: str) -> list[Share] | None:
    """What the other workers told of node `name`: None with one worker (the view is this one's alone)."""
    return None if others is None else others.get(name, [])
