"""What watching a node costs: shipping its logs to the gateway, and a Prometheus scrape of /metrics.

shipping  digits through wrk at concurrency 1 and 64: a node that ships its logs, access lines included, to
          a live gateway (`[logs] ship_to`) against the same node that does not, A B A B. Both write their
          access log; the gateway runs on the same two cores and stores what it gets (SQLite, FTS5).
scrape    GET /metrics of a node that has served both kinds of traffic (request, batch, cache, job, process
          and machine metrics): latency as a kept-alive client sees it, one scrape after another; the size
          of the answer; the CPU time the node spends per scrape.

    python bench/operations.py [--rounds 5] [--seconds 5] [--scrapes 300]

Results go to bench/results/operations-<timestamp>.json, with a summary printed at the end.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from cache import spread
from predict import BIN, alternate, digits_workload, run_wrk
from servers import (
    LIKE_BASELINES,
    Server,
    clean_env,
    cpu_seconds,
    free_port,
    new_result,
    save_result,
    start,
    stop,
)

console = Console()


def node(home: Path, name: str, ship_to: str | None) -> Server:
    port = free_port()
    env = clean_env(EDGEGEN_HOME=str(home), **LIKE_BASELINES)
    if ship_to is not None:
        env |= {"EDGEGEN_LOGS__SHIP_TO": ship_to, "EDGEGEN_LOGS__NODE": name}
    return Server(name, [str(BIN / "edgegen"), "serve", "--port", str(port)], env, "/v2/health/ready", port)


def gateway(root: Path, port: int, nodes: list[Server]) -> Server:
    config = root / "gateway.toml"
    config.write_text("".join(f'[[nodes]]\nname = "{n.name}"\nurl = "{n.base_url}"\n' for n in nodes))
    env = clean_env(EDGEGEN_GATEWAY_HOME=str(root / "gateway"), EDGEGEN_GATEWAY_SECURITY__AUTH="false")
    command = [str(BIN / "edgegen"), "gateway", "--port", str(port), "--config", str(config)]
    return Server("gateway", command, env, "/v2/health/live", port)


def shipping(root: Path, rounds: int, seconds: int) -> dict[str, Any]:
    home, data, wrk = digits_workload(root)
    gw_port = free_port()
    servers = {
        "shipping": node(home, "shipping", f"http://127.0.0.1:{gw_port}"),
        "not-shipping": node(home, "not-shipping", None),
    }
    gw = gateway(root, gw_port, list(servers.values()))
    start(gw, root)
    for server in servers.values():
        start(server, root)
    try:
        runs = alternate(wrk, servers, data, rounds, seconds, "shipping")
        time.sleep(5)  # the last batches on their way
    finally:
        for server in [*servers.values(), gw]:
            stop(server)
    with sqlite3.connect(root / "gateway" / "logs" / "fleet.sqlite") as db:
        stored = db.execute(
            "SELECT COUNT(*) FROM logs WHERE node = 'shipping' AND logger = 'edgegen.access'"
        ).fetchone()[0]
    summary: dict[str, Any] = {}
    for concurrency in (1, 64):
        group = {
            n: [r for r in runs if r["server"] == n and r["concurrency"] == concurrency] for n in servers
        }
        pairs = zip(group["shipping"], group["not-shipping"], strict=True)
        summary[f"c{concurrency}"] = {
            **{f"{n} p50_ms": spread([r["p50_us"] / 1000 for r in g]) for n, g in group.items()},
            **{f"{n} rps": spread([r["correct_rps"] for r in g]) for n, g in group.items()},
            "rps ratio (shipping / not)": spread([a["correct_rps"] / b["correct_rps"] for a, b in pairs]),
        }
    answered = sum(r["correct"] for r in runs if r["server"] == "shipping")
    return {"runs": runs, "summary": summary, "answered": answered, "access_lines_stored": stored}


def scrape(root: Path, scrapes: int, seconds: int) -> dict[str, Any]:
    home, data, wrk = digits_workload(root)
    server = node(home, "scraped", None)
    start(server, root)
    try:
        run_wrk(wrk, server, 8, seconds, data)  # every request metric has samples
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            job = {"method": "POST", "url": "/predict", "body": {"input_data": [1.0] * 64}}
            client.post("/v1/jobs", json=job).raise_for_status()  # the job metrics have samples too
            client.get("/metrics")
            latencies, sizes = [], []
            cpu_before = cpu_seconds(server)
            for _ in range(scrapes):
                began = time.perf_counter()
                answer = client.get("/metrics")
                latencies.append((time.perf_counter() - began) * 1000)
                answer.raise_for_status()
                sizes.append(len(answer.content))
            cpu_ms = (cpu_seconds(server) - cpu_before) * 1000 / scrapes
            series = sum(1 for line in answer.text.splitlines() if line and not line.startswith("#"))
    finally:
        stop(server)
    latencies.sort()
    return {
        "scrapes": scrapes,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "min_ms": latencies[0],
        "max_ms": latencies[-1],
        "bytes": statistics.median(sizes),
        "series": series,
        "node_cpu_ms_per_scrape": cpu_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--scrapes", type=int, default=300)
    args = parser.parse_args()
    result = new_result()
    with tempfile.TemporaryDirectory(prefix="edgegen-ops-bench-") as tmp:
        root = Path(tmp)
        result["shipping"] = shipping(root / "shipping", args.rounds, args.seconds)
        result["scrape"] = scrape(root / "scrape", args.scrapes, args.seconds)
    for level, row in result["shipping"]["summary"].items():
        console.print(f"shipping {level}: {row}")
    console.print(f"scrape: {result['scrape']}")
    console.print(f"results: {save_result('operations', result)}")


if __name__ == "__main__":
    main()
