"""Analysis of the fleet's access lines: error-rate spikes and latency regressions per node and model.

Each shipped access line (`logger: edgegen.access`: status, ms, model) lands in a bucket of its node and
model by its own time, so lines a node spooled while cut off are counted when they happened. Every
`evaluate_s` the last `window_s` is compared with the `baseline_s` before it:

    error spike          ≥ min_requests in the window, a 5xx share ≥ error_rate and ≥ error_factor × the
                         baseline's share
    latency regression   ≥ min_requests in the window and in the baseline, the window's p50 (answers
                         below 500) ≥ latency_factor × the baseline's p50

An alert is raised once (a warning log line, `edgegen_gateway_alerts_total{kind}`, and
`edgegen_gateway_alert_active{kind,node,model}` = 1) and resolved when the comparison no longer holds.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edgegen.gateway.settings import AlertSettings

log = logging.getLogger("edgegen.alerts")
LATENCIES_PER_BUCKET = 512  # kept per bucket for the medians; beyond it a bucket keeps every other one
RECENT_ALERTS = 200


@dataclass
class Bucket:
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    _stride: int = 1

    def add(self, status: int, ms: float | None) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        elif ms is not None and self.requests % self._stride == 0:
            self.latencies.append(ms)
            if len(self.latencies) >= LATENCIES_PER_BUCKET:
                self.latencies = self.latencies[::2]
                self._stride *= 2


@dataclass
class Alert:
    kind: str  # error_spike | latency_regression
    node: str
    model: str
    since: float
    detail: dict[str, float]
    resolved: float | None = None

    def view(self) -> dict[str, Any]:
        return {"kind": self.kind, "node": self.node, "model": self.model, "since": self.since,
                "resolved": self.resolved, **self.detail}  # fmt: skip

    @classmethod
    def of(cls, view: dict[str, Any]) -> Alert:
        """The alert a `view` shows (as another worker kept it)."""
        kind, node, model, since, resolved = (view[k] for k in ("kind", "node", "model", "since", "resolved"))
        detail = {k: v for k, v in view.items() if k not in ("kind", "node", "model", "since", "resolved")}
        return cls(kind, node, model, since, detail, resolved)


# What a comparison finds: (kind, node, model) → the alert's detail, or None where it does not hold.
Findings = dict[tuple[str, str, str], dict[str, float] | None]
# The alerts as GET /gateway/alerts shows them: those active now, and the recent ones, newest first.
Board = tuple[list[dict[str, Any]], list[dict[str, Any]]]


class Analyzer:
    def __init__(
        self,
        settings: AlertSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.bucket_s = settings.window_s / 6
        self.span_s = settings.window_s + settings.baseline_s  # what is compared: older lines count nowhere
        self._series: dict[tuple[str, str], dict[int, Bucket]] = {}
        self.active: dict[tuple[str, str, str], Alert] = {}
        self.recent: deque[Alert] = deque(maxlen=RECENT_ALERTS)
        self.changes = 0  # alerts raised and resolved so far

    def board(self) -> Board:
        """The alerts active and recent (newest first). Read by sync routes in their threads too, while the
        loop raises and resolves: from copies taken in one step each (`list()` runs in C)."""
        active, recent = list(self.active.values()), list(self.recent)
        return [a.view() for a in active], [a.view() for a in reversed(recent)]

    def resume(self, board: Board) -> None:
        """Go on from the alerts another worker left (it led the analysis until it died): those active
        stay active, not raised again, until the comparison no longer holds."""
        active, recent = board
        self.recent.extend(Alert.of(view) for view in reversed(recent))
        by_key = {(a.kind, a.node, a.model, a.since): a for a in self.recent}
        for view in active:
            alert = by_key.get((view["kind"], view["node"], view["model"], view["since"])) or Alert.of(view)
            self.active[(alert.kind, alert.node, alert.model)] = alert

    def observe(self, lines: Iterable[dict[str, Any]]) -> None:
        """Shipped lines (with `node` and `time`); access lines are counted, others ignored."""
        oldest = self.clock() - self.span_s
        for line in lines:
            status = line.get("status")
            if line.get("logger") != "edgegen.access" or type(status) is not int or line["time"] < oldest:
                continue
            ms = line.get("ms")
            key = (str(line["node"]), str(line.get("model") or "-"))
            buckets = self._series.setdefault(key, {})
            index = math.floor(line["time"] / self.bucket_s)
            buckets.setdefault(index, Bucket()).add(
                status, float(ms) if isinstance(ms, int | float) else None
            )

    def evaluate(self) -> list[Alert]:
        """Compare every node and model's window with its baseline; return the alerts raised now."""
        now = self.clock()
        return self.settle(self.compare(now), now)

    def compare(self, now: float) -> Findings:
        """What each kind of alert finds for every node and model at `now` (a detail, or None), buckets
        older than the span dropped. It reads and prunes the counts alone, never the alerts: the gateway
        runs it in a worker thread (background.py), for the medians of a busy fleet's span take a while."""
        s = self.settings
        start = math.floor((now - s.window_s) / self.bucket_s)
        first = math.floor((now - s.window_s - s.baseline_s) / self.bucket_s)
        findings: Findings = {}
        for (node, model), buckets in list(self._series.items()):
            for index in [i for i in buckets if i < first]:
                del buckets[index]
            if not buckets:
                del self._series[(node, model)]
            window = [b for i, b in buckets.items() if i >= start]
            baseline = [b for i, b in buckets.items() if i < start]
            findings["error_spike", node, model] = self._spike(window, baseline)
            findings["latency_regression", node, model] = self._regression(window, baseline)
        return findings

    def settle(self, findings: Findings, now: float) -> list[Alert]:
        """Raise what `findings` finds and is not active yet, resolve what is active and found no more (or
        whose node and model sent nothing in the span); return the alerts raised."""
        raised = []
        for key, detail in findings.items():
            if detail is not None and key not in self.active:
                alert = self.active[key] = Alert(*key, now, detail)
                self.recent.append(alert)
                raised.append(alert)
                self.changes += 1
                log.warning("alert raised", extra=alert.view())
            elif detail is None and key in self.active:
                self._resolve(key, now)
        for key in [k for k in self.active if k not in findings]:
            self._resolve(key, now)
        return raised

    def _resolve(self, key: tuple[str, str, str], now: float) -> None:
        alert = self.active.pop(key)
        alert.resolved = now
        self.changes += 1
        log.info("alert resolved", extra=alert.view())

    def _spike(self, window: list[Bucket], baseline: list[Bucket]) -> dict[str, float] | None:
        s = self.settings
        requests = sum(b.requests for b in window)
        if requests < s.min_requests:
            return None
        rate = sum(b.errors for b in window) / requests
        before = sum(b.requests for b in baseline)
        base_rate = sum(b.errors for b in baseline) / before if before else 0.0
        if rate >= s.error_rate and rate >= s.error_factor * base_rate:
            return {
                "error_rate": round(rate, 4),
                "baseline_error_rate": round(base_rate, 4),
                "requests": requests,
            }
        return None

    def _regression(self, window: list[Bucket], baseline: list[Bucket]) -> dict[str, float] | None:
        s = self.settings
        recent = [ms for b in window for ms in b.latencies]
        before = [ms for b in baseline for ms in b.latencies]
        if len(recent) < s.min_requests or len(before) < s.min_requests:
            return None
        p50, base_p50 = statistics.median(recent), statistics.median(before)
        if base_p50 > 0 and p50 >= s.latency_factor * base_p50:
            return {"p50_ms": round(p50, 3), "baseline_p50_ms": round(base_p50, 3), "requests": len(recent)}
        return None
