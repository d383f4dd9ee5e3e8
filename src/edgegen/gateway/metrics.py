"""The gateway's Prometheus metrics, in a registry of its own (the security gate adds its counters there).

    edgegen_gateway_upstream_seconds{node}              one try at one node, from sending to the last byte
    edgegen_gateway_attempts_total{node,outcome}        tries by outcome: 2xx … 5xx, or error (no answer)
    edgegen_gateway_responses_total{status}             answers to clients (the request boundary's count)
    edgegen_gateway_retries                             requests sent again to another node
    edgegen_gateway_nodes{state}                        known, and available (taking traffic)
    edgegen_gateway_node_{available,in_flight,last_seen_seconds}{node}   read from the fleet at each scrape
    edgegen_gateway_alerts_total{kind}                  alerts raised (gateway/alerts.py)
    edgegen_gateway_alert_active{kind,node,model}       1 for every alert active now
    edgegen_gateway_vulnerable_packages{node}           at the last GET /gateway/audit
    python_gc_collections_total, edgegen_gc_seconds_total{generation}   the cycle collector (observe/heap.py)

Per-node gauges are collectors rather than labelled children: nodes come and go at run time, and a node
removed must leave the scrape with it. With several workers (`--workers N`, shared.py) the counters and
histograms are prometheus_client's multiprocess files, summed at each scrape whichever worker answers it;
the fleet's gauges are read from the fleet, which every worker shares (in flight: the answering worker's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgegen.gateway.alerts import Alert, Board
from edgegen.gateway.fleet import Fleet
from edgegen.gateway.proxy import Attempt
from edgegen.observe.heap import GcCollector
from edgegen.observe.metrics import LATENCY_BUCKETS

_OUTCOMES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class GatewayMetrics:
    """The proxy's observer (each try, each retry), the request boundary's (each answer), and the gauges
    of the fleet and its alerts."""

    def __init__(self, fleet: Fleet, alerts: Callable[[], Board]) -> None:
        self.fleet = fleet
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.upstream = Histogram(
            "edgegen_gateway_upstream_seconds",
            "One try of a request at one node, from sending it to the last byte back.",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "edgegen_gateway_attempts_total", "Tries at a node, by outcome.", ["node", "outcome"], registry=r
        )
        self.responses = Counter(
            "edgegen_gateway_responses_total", "Responses to clients by status.", ["status"], registry=r
        )
        self.retries = Gauge(
            "edgegen_gateway_retries",
            "Requests sent again to another node.",
            registry=r,
            multiprocess_mode="sum",
        )
        self.alerts = Counter("edgegen_gateway_alerts", "Alerts raised, by kind.", ["kind"], registry=r)
        self.vulnerable = Gauge(
            "edgegen_gateway_vulnerable_packages",
            "Installed packages with a known advisory, per node (at the last GET /gateway/audit).",
            ["node"],
            registry=r,
            multiprocess_mode="mostrecent",  # whichever worker ran the audit
        )
        self.collectors = (FleetCollector(fleet), AlertCollector(alerts))
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        for collector in self.collectors:
            r.register(collector)
        if not self.multiprocess:  # (one worker's collector would pass for the gateway's)
            r.register(GcCollector())
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._statuses: dict[int, Any] = {}

    def attempt(self, attempt: Attempt, seconds: float) -> None:
        name = attempt.backend.name
        if attempt.error is not None:
            outcome = "error"
        else:
            assert attempt.response is not None
            outcome = _OUTCOMES[attempt.response.status // 100]
        self.fleet.record_try(attempt.backend, seconds, outcome in ("error", "5xx"))
        # Labelled children are looked up once per (node, outcome): labels() costs more than the update.
        children = self._children.get((name, outcome))
        if children is None:
            children = self._children[(name, outcome)] = (
                self.upstream.labels(name),
                self.attempts.labels(name, outcome),
            )
        children[0].observe(seconds)
        children[1].inc()

    def source(self) -> CollectorRegistry:
        """What a scrape reads: this registry, or with several workers the files of all of them."""
        if not self.multiprocess:
            return self.registry
        source = CollectorRegistry()
        multiprocess.MultiProcessCollector(source)  # type: ignore[no-untyped-call]  # its __init__ is unannotated
        for collector in self.collectors:
            source.register(collector)
        return source

    def retried(self) -> None:
        self.retries.inc()

    def observe_request(self, template: str, method: str, model: str, status: int, seconds: float) -> None:
        """One answer to a client (the request boundary's count): by status."""
        child = self._statuses.get(status)
        if child is None:
            child = self._statuses[status] = self.responses.labels(str(status))
        child.inc()

    def alert_raised(self, alert: Alert) -> None:
        self.alerts.labels(alert.kind).inc()

    def vulnerable_found(self, node: str, count: int) -> None:
        """A node's count of packages with a known advisory, at the last audit (gateway/audit.py)."""
        self.vulnerable.labels(node).set(count)


class FleetCollector(Collector):
    """Per-node gauges read from the fleet at each scrape (nodes come and go at run time)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily(
            "edgegen_gateway_nodes", "Nodes in the fleet, and how many take traffic.", labels=["state"]
        )
        nodes.add_metric(["known"], len(self.fleet.nodes))
        nodes.add_metric(["available"], len(self.fleet.available()))
        yield nodes
        available = GaugeMetricFamily(
            "edgegen_gateway_node_available", "1 when the node takes traffic now.", labels=["node"]
        )
        in_flight = GaugeMetricFamily(
            "edgegen_gateway_node_in_flight", "Requests at the node from this gateway now.", labels=["node"]
        )
        seen = GaugeMetricFamily(
            "edgegen_gateway_node_last_seen_seconds", "Since the node last passed a check.", labels=["node"]
        )
        taking = {b.name for b in self.fleet.available()}
        now = time.time()
        counts = self.fleet.in_flight()
        for name, member in list(self.fleet.nodes.items()):  # (a scrape's thread: a copy, fleet.py)
            available.add_metric([name], float(name in taking))
            in_flight.add_metric([name], counts[name])
            if member.last_seen is not None:
                seen.add_metric([name], now - member.last_seen)
        yield from (available, in_flight, seen)


class AlertCollector(Collector):
    """1 for every alert active now (gateway/alerts.py; with several workers, the leader's)."""

    def __init__(self, alerts: Callable[[], Board]) -> None:
        self.alerts = alerts

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "edgegen_gateway_alert_active", "Alerts active now.", labels=["kind", "node", "model"]
        )
        for alert in self.alerts()[0]:
            active.add_metric([alert["kind"], alert["node"], alert["model"]], 1.0)
        yield active
