"""observe/heap.py: start-up's heap settled (collected, frozen, collected less often), collections timed."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

from prometheus_client import CollectorRegistry, generate_latest

from edgegen.observe.heap import YOUNG_THRESHOLD, GcCollector

# In a fresh interpreter: the test process' own collector stays as pytest set it.
SETTLE = """
import gc, json, weakref
from edgegen.observe.heap import settle

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle only the collector frees
gone = weakref.ref(a)
del a, b
kept = [object() for _ in range(10)]
settle()
print(json.dumps({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                  "cycle_freed": gone() is None}))
"""


def test_settle_frees_start_ups_garbage_freezes_the_rest_and_collects_the_young_less_often() -> None:
    done = subprocess.run([sys.executable, "-c", SETTLE], capture_output=True, text=True, check=True)
    facts = json.loads(done.stdout)
    assert facts["cycle_freed"]
    assert facts["frozen"] > 1_000  # the interpreter's and edgegen's modules at least
    assert facts["threshold"] == [YOUNG_THRESHOLD, *gc.get_threshold()[1:]]


def sample(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_the_collector_counts_collections_and_their_time_by_generation() -> None:
    registry = CollectorRegistry()
    registry.register(GcCollector())
    before = generate_latest(registry).decode()
    for _ in range(3):
        gc.collect(1)
    after = generate_latest(registry).decode()
    young = 'python_gc_collections_total{generation="1"}'
    assert sample(after, young) >= sample(before, young) + 3
    seconds = 'edgegen_gc_seconds_total{generation="1"}'
    assert sample(after, seconds) > sample(before, seconds)
    assert "# TYPE edgegen_gc_seconds_total counter" in after
