"""How long the gateway's background work holds its event loop at fleet scale (issue 19, "fleet at scale").

A gateway relays on one event loop: whatever else runs there stalls every request in flight. Two of its
background tasks grow with the fleet; each is run here as the gateway runs it, on real stores:

analysis  a worker that takes the lead reads the alert analysis' whole span back from the log store and
          compares it (`background.analyse`): `--lines` access lines of 10 nodes and 3 models over the
          default span (660 s). Measured: how long it takes, and the longest the loop went without a turn
          (a coroutine beside it that wakes every millisecond).
shares    a worker of `--workers N` publishes its share of each node's traffic every half second
          (`SharedFleet.publish`, all on the loop): `--nodes` nodes with full deques of recent tries, and
          4,000 new tries between publishes (half a second at 8,000 answers/s). Measured: a publish's time.
view      a one-process gateway's fleet view (`GET /gateway/fleet`, in a route's thread, which holds the
          interpreter as long), the same nodes and tries, between two views. Measured: a view's time.

With `--baseline-src DIR` the same runs on another tree's `src/` too (A B in rounds, one process each), on
the same log store, built once.

    python bench/fleet_loops.py [--lines 600000] [--nodes 10,100] [--rounds 3] [--baseline-src DIR]

Results go to bench/results/fleet_loops-<timestamp>.json, with a Markdown table printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console

from servers import new_result, save_result

console = Console()
NODES, MODELS = 10, 3
SPAN_S = 640.0  # of the lines, within the analysis' default span (window 60 s + baseline 600 s)
NEW_TRIES = 4_000  # between two publishes
SRC = Path(__file__).resolve().parent.parent / "src"


def build_store(path: Path, lines: int) -> float:
    """`lines` access lines of NODES nodes, evenly over SPAN_S up to 10 s ago; the time they end at."""
    from edgegen.gateway.logstore import LogStore
    from edgegen.observe.logs import timestamp

    store, now, per_node = LogStore(path), time.time(), lines // NODES
    for node in range(NODES):
        for first in range(0, per_node, 5_000):
            entries: list[Any] = []
            for i in range(first, min(per_node, first + 5_000)):
                ts = now - 10 - SPAN_S + SPAN_S * i / per_node
                line = {"ts": timestamp(ts), "level": "info", "logger": "edgegen.access", "status": 200,
                        "ms": 5.0 + i % 7, "model": f"m{i % MODELS}", "path": "/predict"}  # fmt: skip
                entries.append([i, line])
            store.add(f"node{node}", "s1", entries)
    store.close()
    return now


async def analysis(path: Path, now: float) -> dict[str, float]:
    from edgegen.gateway import background
    from edgegen.gateway.alerts import Analyzer
    from edgegen.gateway.fleetlogs import FleetLogs
    from edgegen.gateway.logstore import LogStore
    from edgegen.gateway.settings import AlertSettings, LogStoreSettings

    analyzer = Analyzer(AlertSettings(), clock=lambda: now)
    logs = FleetLogs(LogStore(path), analyzer, LogStoreSettings())
    metrics = SimpleNamespace(alert_raised=lambda alert: None)
    state = SimpleNamespace(analyzer=analyzer, logs=logs, shared=None, metrics=metrics)
    longest = 0.0
    running = True

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            tick = time.perf_counter()
            longest, last = max(longest, tick - last), tick

    beside = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await background.analyse(state)  # type: ignore[arg-type]
    took = time.perf_counter() - started
    await asyncio.sleep(0.01)  # (the ticker's turn after the last stretch)
    running = False
    await beside
    logs.close()
    return {"analysis_s": took, "longest_stall_ms": longest * 1000}


def shares(nodes: int) -> tuple[float, float]:
    """The median time of a publish (of a worker of several), and of a fleet view (one process), in ms."""
    from edgegen.gateway.fleet import RECENT_TRIES, Fleet
    from edgegen.gateway.settings import HealthSettings, NodeEntry, OutlierSettings
    from edgegen.gateway.shared import SharedFleet

    rng, clock = random.Random(5), [1_000.0]
    fleet = Fleet(HealthSettings(), OutlierSettings(), clock=lambda: clock[0])
    for i in range(nodes):
        fleet.add(NodeEntry(url=f"http://10.0.{i // 250}.{i % 250 + 1}:8000"))
    members = list(fleet.nodes.values())
    for member in members:
        for k in range(RECENT_TRIES):
            member.traffic.add(clock[0] - 30 + k * 0.01, rng.uniform(0.001, 0.02), False)

    def timed(action: Callable[[], object]) -> float:
        """`action` once (the first counts every try there is), then 9 times, NEW_TRIES after each."""
        action()
        times = []
        for _ in range(9):
            for k in range(NEW_TRIES):
                members[k % nodes].traffic.add(clock[0] + k / 8_000, rng.uniform(0.001, 0.02), k % 50 == 0)
            clock[0] += 0.5
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    view = timed(fleet.view)
    with tempfile.TemporaryDirectory(prefix="edgegen-fleet-loops-") as tmp:
        shared = SharedFleet(Path(tmp), fleet)
        publish = timed(shared.publish)
        shared.close()
    return publish, view


def child(store: Path, now: float, nodes: list[int]) -> dict[str, float]:
    result = asyncio.run(analysis(store, now))
    for n in nodes:
        result[f"publish_ms_{n}_nodes"], result[f"view_ms_{n}_nodes"] = shares(n)
    return result


def run_tree(src: Path, store: Path, now: float, nodes: list[int]) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(store), str(now), ",".join(map(str, nodes))]
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        store, now, nodes = Path(sys.argv[2]), float(sys.argv[3]), [int(n) for n in sys.argv[4].split(",")]
        print(json.dumps(child(store, now, nodes)))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=600_000)
    parser.add_argument("--nodes", default="10,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-src", default=None, help="another tree's src/, run beside this one")
    args = parser.parse_args()
    nodes = [int(n) for n in args.nodes.split(",")]
    trees = {"edgegen": SRC, **({"base": Path(args.baseline_src)} if args.baseline_src else {})}
    result = new_result()
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="edgegen-fleet-loops-") as tmp:
        store = Path(tmp) / "fleet.sqlite"
        started = time.perf_counter()
        now = build_store(store, args.lines)
        console.print(f"{args.lines:,} access lines stored in {time.perf_counter() - started:.0f} s")
        for number in range(args.rounds):
            order = list(trees.items())
            for name, src in order if number % 2 == 0 else reversed(order):
                rows[name].append(run_tree(src, store, now, nodes))
                console.print(f"round {number} {name}: {rows[name][-1]}")
    result["rows"] = rows
    console.print("\n| tree | " + " | ".join(rows[next(iter(rows))][0]) + " |")
    console.print("|---" * (1 + len(rows[next(iter(rows))][0])) + "|")
    for name, runs in rows.items():
        cells = []
        for key in runs[0]:
            values = [run[key] for run in runs]
            cells.append(f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})")
        console.print(f"| {name} | " + " | ".join(cells) + " |")
    console.print(f"results: {save_result('fleet_loops', result)}")


if __name__ == "__main__":
    main()
