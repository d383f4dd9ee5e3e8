"""The interpreter's cycle collector on a server: kept off what start-up built, run less often, timed.

A node or a gateway builds ~100,000 objects at start-up (its app, settings, metrics, models' sessions)
that live as long as the process. CPython's collector examines them again at every full collection, and
collects its youngest generation whenever allocations of containers outrun deallocations by 700: with 64
requests in flight, each holding its coroutines, frames and dicts, that was every ~35 answers on the
gateway. Measured there at 64 clients (docs/benchmarks.md, "2026-12-04, late"): ~23 µs of collection
per answer, 13 of them in full collections (~54 ms pauses of the loop, which set the p99).

`settle()`, once the server is ready: collect what start-up left behind, freeze the rest (it moves to a
generation the collector never examines), and raise the youngest generation's threshold tenfold. Cycles
made later are still found, in collections now cheap: ~1.4 µs an answer in the same measurement. What
freezing costs: a cycle of start-up objects that later becomes garbage (a setting replaced at run time)
is never freed — a few objects per change, bounded by the changes made.

`GcCollector` shows the collector's work in `/metrics` — collections and their time, by generation —
where a change that makes a request allocate more, or hold a cycle, shows up.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

YOUNG_THRESHOLD = 7_000  # net container allocations between collections of the youngest generation
GENERATIONS = 3
GENERATION = ["generation"]  # the metrics' label


def settle() -> None:
    """Start-up's garbage collected, the rest frozen, the youngest generation collected less often."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)


class _Pauses:
    """Seconds spent collecting, by the oldest generation each collection took (one per process)."""

    def __init__(self) -> None:
        self.seconds = [0.0] * GENERATIONS
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._started


_pauses: _Pauses | None = None


def pauses() -> _Pauses:
    """This process's timer of collections, installed at the first call."""
    global _pauses
    if _pauses is None:
        _pauses = _Pauses()
        gc.callbacks.append(_pauses)
    return _pauses


class GcCollector(Collector):
    """`python_gc_collections_total` and `edgegen_gc_seconds_total`, by generation, at each scrape."""

    def __init__(self) -> None:
        self.pauses = pauses()

    def collect(self) -> Iterator[Metric]:
        collections = CounterMetricFamily(
            "python_gc_collections", "Collections of the cycle collector, by generation.", labels=GENERATION
        )
        seconds = CounterMetricFamily(
            "edgegen_gc_seconds", "Time the cycle collector took, by generation.", labels=GENERATION
        )
        for generation, stats in enumerate(gc.get_stats()):
            collections.add_metric([str(generation)], stats["collections"])
            seconds.add_metric([str(generation)], self.pauses.seconds[generation])
        yield collections
        yield seconds
