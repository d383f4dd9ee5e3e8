"""Deployment modes on this machine: one node process against `--workers 2`, the same home and model.

    python bench/workers.py [--rounds 3] [--seconds 5]

digits /predict through wrk + bench/predict.lua (answers checked) at concurrency 1 and 64, rounds A B A B;
also each server's resident memory once warm. Results go to bench/results/workers-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from predict import BIN, digits_workload, run_wrk
from servers import (
    LIKE_BASELINES,
    Server,
    clean_env,
    free_port,
    memory_of,
    new_result,
    save_result,
    start,
    stop,
)

console = Console()


def node(home: Path, workers: int) -> Server:
    port = free_port()
    command = [str(BIN / "edgegen"), "serve", "--port", str(port), "--workers", str(workers)]
    env = clean_env(EDGEGEN_HOME=str(home), EDGEGEN_ACCESS_LOG="false", **LIKE_BASELINES)
    return Server(f"workers-{workers}", command, env, "/v2/health/ready", port)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    result = new_result()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgegen-workers-bench-") as tmp:
        root = Path(tmp)
        home, data, wrk = digits_workload(root)
        servers = [node(home, 1), node(home, 2)]
        for server in servers:
            start(server, root)
        try:
            for server in servers:
                run_wrk(wrk, server, 8, 2, data)  # warm every worker up
                result.setdefault("memory", {})[server.name] = memory_of(server)
            for round_no in range(args.rounds):
                for concurrency in (1, 64):
                    for server in servers:  # A B A B
                        got = run_wrk(wrk, server, concurrency, args.seconds, data)
                        assert (got["wrong"], got["non_200"]) == (0, 0), got
                        runs.append(
                            {"server": server.name, "concurrency": concurrency, "round": round_no, **got}
                        )
                        p50, rps = got["p50_us"], got["correct_rps"]
                        console.print(
                            f"{server.name} c{concurrency} round {round_no}: p50 {p50} µs, {rps:.0f}/s"
                        )
        finally:
            for server in servers:
                stop(server)
    summary = {}
    for concurrency in (1, 64):
        for server in servers:
            group = [r for r in runs if r["server"] == server.name and r["concurrency"] == concurrency]
            rps = [r["correct_rps"] for r in group]
            p50 = [r["p50_us"] / 1000 for r in group]
            summary[f"{server.name} c{concurrency}"] = {
                "rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
                "p50_ms": statistics.median(p50), "p50_min": min(p50), "p50_max": max(p50),
            }  # fmt: skip
    result |= {"runs": runs, "summary": summary}
    for name, row in summary.items():
        console.print(f"{name}: {row}")
    console.print(f"memory: {result['memory']}")
    console.print(f"results: {save_result('workers', result)}")


if __name__ == "__main__":
    main()
