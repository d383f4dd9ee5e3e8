"""Benchmark what tracing costs a prediction (observe/tracing.py): off, on, and the tree before it.

One client (wrk + bench/predict.lua, every answer checked) sends `POST /predict` through a gateway to a node,
A B C D in rounds, for each of its fleets (a gateway and its node each):

    off       tracing off (the default)
    on        `[tracing] endpoint` set on gateway and node, every request sampled: spans exported over
              OTLP/HTTP to a sink in this process that reads and drops them
    base      (with `--baseline-src DIR`) both servers run from another tree's `src/`: the cost of "off"
    base-on   (with `--baseline-src DIR`) that tree with tracing on, as `on`: what a change to tracing gained

Reports p50, p99 and the CPU an answer costs node and gateway together per fleet, and the ratios on/off,
off/base and on/base-on, per round and as medians. Targets (issue 19): on ≤ 1.03× off at p50; off: no
measurable cost.

    python bench/tracing.py [--rounds 5] [--duration 5] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import http.server
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

from rich.console import Console

from gateway import gateway, node
from predict import digits_workload, run_wrk
from servers import Server, cpu_seconds, new_result, save_result, start, stop

console = Console()


class Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that reads each export and answers 200 (what a collector does first), on a
    kept-alive connection as a collector does."""

    protocol_version = "HTTP/1.1"
    exports = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).exports += 1
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def fleet(home: Path, root: Path, name: str, env: dict[str, str]) -> tuple[Server, Server]:
    target = node(home, f"{name}-node")
    front = gateway(root, f"{name}-gateway", [target], "least_connections")
    for server in (target, front):
        server.env.update(env)
    return target, front


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--baseline-src", default=None, help="another tree's src/, off and on")
    args = parser.parse_args()
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    result = new_result()
    with tempfile.TemporaryDirectory(prefix="edgegen-tracing-bench-") as tmp:
        root = Path(tmp)
        home, data, wrk_bin = digits_workload(root)
        on = {"EDGEGEN_TRACING__ENDPOINT": endpoint, "EDGEGEN_GATEWAY_TRACING__ENDPOINT": endpoint}
        fleets = {"off": fleet(home, root, "off", {}), "on": fleet(home, root, "on", on)}
        if args.baseline_src:
            fleets["base"] = fleet(home, root, "base", {"PYTHONPATH": args.baseline_src})
            fleets["base-on"] = fleet(home, root, "base-on", {"PYTHONPATH": args.baseline_src, **on})
        rows: list[dict[str, Any]] = []
        try:
            for pair in fleets.values():
                for server in pair:
                    start(server, root)
            for r in range(args.rounds):
                order = list(fleets.items()) if r % 2 == 0 else list(reversed(fleets.items()))
                for name, (target, front) in order:
                    run_wrk(wrk_bin, front, 1, 1, data)  # warm-up
                    before = cpu_seconds(target) + cpu_seconds(front)
                    run = run_wrk(wrk_bin, front, 1, args.duration, data)
                    assert (run["wrong"], run["non_200"]) == (0, 0), run
                    spent = cpu_seconds(target) + cpu_seconds(front) - before
                    run["cpu_us_per_answer"] = spent / max(run["correct"], 1) * 1e6
                    rows.append({"round": r, "fleet": name, **run})
                    console.print(
                        f"round {r} {name}: p50 {run['p50_us']} µs, p99 {run['p99_us']} µs, "
                        f"CPU {run['cpu_us_per_answer']:.0f} µs an answer (node and gateway)"
                    )
        finally:
            for pair in fleets.values():
                for server in reversed(pair):
                    stop(server)
    sink.shutdown()
    result["rows"], result["exports"] = rows, Sink.exports
    for a, b in (("on", "off"), ("off", "base"), ("on", "base-on")):
        if b not in fleets:
            continue
        for figure in ("p50_us", "cpu_us_per_answer"):
            ratios = []
            for r in range(args.rounds):
                same = {row["fleet"]: row for row in rows if row["round"] == r}
                ratios.append(round(same[a][figure] / same[b][figure], 3))
            med = statistics.median(ratios)
            result[f"{figure}_{a}_over_{b}"] = [med, min(ratios), max(ratios)]
            spread = f"{med:.3f} ({min(ratios):.3f}–{max(ratios):.3f})"
            console.print(f"{figure} {a}/{b}: {spread} by round {ratios}")
    console.print(f"OTLP exports received: {Sink.exports}")
    console.print(f"results: {save_result('tracing', result)}")


if __name__ == "__main__":
    main()
