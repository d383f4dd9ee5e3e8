"""Benchmark `edgegen gateway`: its added latency against nginx, balancing an uneven fleet, and pick cost.

overhead  One node (`edgegen serve`, digits). wrk + bench/predict.lua (every answer checked against the
          logits ONNX Runtime gives for that image) straight to the node, through our gateway, and
          through nginx (Debian's, started here with an equivalent `least_conn` upstream and keepalive),
          at concurrency 1 and 64, in rounds (A B C A B C …). Added p50 / p99 = via − direct, same round.
          Target: our added p50 ≤ 2× nginx's and ≤ 1 ms.
uneven    Three nodes serving `digits`; one of them serves a 64-4096-4096-10 MLP under that name
          (a slower machine, in effect: the same request costs it ~40× the compute). Concurrency 16
          through the gateway with round_robin, least_connections and p2c_ewma (one gateway each), and
          nginx round robin. Answers are checked for shape only (the slow node's logits differ).
          Target: p2c_ewma p99 ≥ 2× lower than round_robin's.
pick      In process: µs per `pick` of each balancer over 1,000 registered nodes (median of 5 × 20,000).

    python bench/gateway.py [--rounds 3] [--duration 5] [--skip uneven]

Results go to bench/results/gateway-<timestamp>.json, with a Markdown table printed at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from edgegen.gateway.balancers import Backend, make_balancer
from edgegen.optimize.onnx_export import mlp_to_onnx
from edgegen.optimize.train import fresh_mlp
from predict import BIN, LUA, ensure_models, ensure_wrk, model_file, write_data
from servers import Server, clean_env, free_port, machine_facts, start, stop

console = Console()
RESULTS = Path(__file__).parent / "results"
BALANCERS = ("round_robin", "weighted_round_robin", "least_connections", "p2c_ewma", "prefix_affinity")


def node(home: Path, name: str) -> Server:
    port = free_port()
    command = [str(BIN / "edgegen"), "serve", "--port", str(port)]
    return Server(name, command, clean_env(EDGEGEN_HOME=str(home)), "/v2/health/ready", port)


def gateway(root: Path, name: str, nodes: list[Server], balancer: str) -> Server:
    port = free_port()
    config = root / f"{name}.toml"
    lines = [f'[[nodes]]\nurl = "{n.base_url}"\n' for n in nodes]
    # Top-level keys come before the first table.
    config.write_text(f'access_log = false\n{"".join(lines)}[balancer]\ndefault = "{balancer}"\n')
    command = [str(BIN / "edgegen"), "gateway", "--config", str(config), "--port", str(port)]
    return Server(name, command, clean_env(), "/v2/health/ready", port)


def nginx(root: Path, name: str, nodes: list[Server], method: str) -> Server:
    port = free_port()
    prefix = root / name
    (prefix / "logs").mkdir(parents=True)
    upstream = "\n".join(f"    server 127.0.0.1:{n.port};" for n in nodes)
    (prefix / "nginx.conf").write_text(f"""
worker_processes 1;
error_log logs/error.log warn;
pid logs/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream fleet {{
    {method}
{upstream}
    keepalive 128;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://fleet;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
    location = /nginx-ready {{ return 200; }}
  }}
}}
""")
    command = [ensure_nginx(), "-p", str(prefix), "-c", "nginx.conf", "-g", "daemon off;"]
    return Server(name, command, clean_env(), "/nginx-ready", port)


def ensure_nginx() -> str:
    found = shutil.which("nginx") or (Path("/usr/sbin/nginx").is_file() and "/usr/sbin/nginx")
    if not found:
        console.print("[bold]nginx[/] is missing: apt-get install -y nginx-light")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True)
        found = "/usr/sbin/nginx"
    return str(found)


def wrk(
    wrk_bin: str, server: Server, concurrency: int, seconds: int, data: Path, check: str
) -> dict[str, Any]:
    threads = min(concurrency, 2)
    command = [wrk_bin, "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds}s", "--timeout", "5s"]
    if check == "values":
        command[2] = str(concurrency)  # one connection per thread: answers are checked request by request
    command += ["-s", str(LUA), server.base_url, "--", str(data), "/predict", check]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            result["rps"] = result["correct"] / (result["duration_us"] / 1e6)
            return result
    raise RuntimeError(f"wrk failed: {done.stderr.strip() or done.stdout.strip()}")


def overhead(
    home: Path, root: Path, rounds: int, seconds: int, data: Path, wrk_bin: str
) -> list[dict[str, Any]]:
    target = node(home, "node")
    start(target, root)
    servers = [target, gateway(root, "edgegen-gateway", [target], "least_connections"),
               nginx(root, "nginx", [target], "least_conn;")]  # fmt: skip
    rows = []
    try:
        for server in servers[1:]:
            start(server, root)
        for r in range(rounds):
            for concurrency in (1, 64):
                for server in servers:
                    wrk(wrk_bin, server, concurrency, 1, data, "values")  # warm-up
                    result = wrk(wrk_bin, server, concurrency, seconds, data, "values")
                    rows.append({"round": r, "server": server.name, "concurrency": concurrency, **result})
                    console.print(
                        f"round {r} c{concurrency} {server.name}: {result['rps']:.0f} req/s, "
                        f"p50 {result['p50_us']} µs, p99 {result['p99_us']} µs, wrong {result['wrong']}"
                    )
    finally:
        for server in reversed(servers):
            stop(server)
    return rows


def slow_model(path: Path) -> None:
    layers = fresh_mlp([64, 4096, 4096, 10], 0, 16.0)
    path.write_bytes(mlp_to_onnx(layers))


def uneven(
    home: Path, root: Path, rounds: int, seconds: int, data: Path, wrk_bin: str
) -> list[dict[str, Any]]:
    slow_home = root / "slow-home"
    slow_model(root / "slow.onnx")
    subprocess.run([str(BIN / "edgegen"), "models", "add", str(root / "slow.onnx"), "--name", "digits"],
                   env=clean_env(EDGEGEN_HOME=str(slow_home)), check=True, capture_output=True)  # fmt: skip
    nodes = [node(home, "fast-1"), node(home, "fast-2"), node(slow_home, "slow")]
    fronts = [gateway(root, f"gw-{b}", nodes, b) for b in ("round_robin", "least_connections", "p2c_ewma")]
    fronts.append(nginx(root, "nginx-rr", nodes, ""))
    rows = []
    try:
        for server in [*nodes, *fronts]:
            start(server, root)
        for r in range(rounds):
            for server in fronts:
                wrk(wrk_bin, server, 16, 1, data, "shape")
                result = wrk(wrk_bin, server, 16, seconds, data, "shape")
                rows.append({"round": r, "server": server.name, "concurrency": 16, **result})
                console.print(
                    f"round {r} {server.name}: {result['rps']:.0f} req/s, p50 {result['p50_us']} µs, "
                    f"p99 {result['p99_us']} µs, errors {result['non_200'] + result['socket_errors']}"
                )
    finally:
        for server in reversed([*nodes, *fronts]):
            stop(server)
    return rows


def pick_cost(n: int = 1000, picks: int = 20_000, repeats: int = 5) -> dict[str, float]:
    rng = random.Random(0)
    nodes = [
        Backend(f"n{i}", f"http://10.0.{i // 250}.{i % 250}:8000", weight=rng.randint(1, 5),
                in_flight=rng.randint(0, 20), ewma_s=rng.uniform(0.001, 0.02))
        for i in range(n)
    ]  # fmt: skip
    keys = [f"prompt {i}".encode() for i in range(1000)]
    costs = {}
    for name in BALANCERS:
        balancer = make_balancer(name)
        balancer.pick(nodes, keys[0])  # builds a ring, where there is one
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for i in range(picks):
                balancer.pick(nodes, keys[i % 1000])
            times.append((time.perf_counter() - started) / picks * 1e6)
        costs[name] = round(statistics.median(times), 2)
    return costs


def summarize(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["server"], row["concurrency"]), []).append(row)
    return {
        key: {
            "rps": statistics.median(r["rps"] for r in group),
            "p50_ms": statistics.median(r["p50_us"] for r in group) / 1000,
            "p99_ms": statistics.median(r["p99_us"] for r in group) / 1000,
            "p50_ms_min": min(r["p50_us"] for r in group) / 1000,
            "p50_ms_max": max(r["p50_us"] for r in group) / 1000,
            "wrong": sum(r["wrong"] for r in group),
            "errors": sum(r["non_200"] + r["socket_errors"] for r in group),
        }
        for key, group in groups.items()
    }


def added(rows: list[dict[str, Any]], via: str, concurrency: int, pct: str) -> tuple[float, float, float]:
    """Median (min, max) over rounds of via − direct latency, in ms."""
    deltas = []
    for r in sorted({row["round"] for row in rows}):
        same = {row["server"]: row for row in rows if row["round"] == r and row["concurrency"] == concurrency}
        deltas.append((same[via][pct] - same["node"][pct]) / 1000)
    return statistics.median(deltas), min(deltas), max(deltas)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated: overhead, uneven, pick")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    result: dict[str, Any] = {"date": stamp, "machine": machine_facts(), "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory(prefix="edgegen-gateway-bench-") as tmp:
        root = Path(tmp)
        home = root / "home"
        ensure_models(home)
        data = root / "data.txt"
        write_data(model_file(home, "digits", "model.onnx"), 64, data)
        wrk_bin = ensure_wrk()
        if "pick" not in skip:
            result["pick_us"] = pick_cost()
            console.print(f"pick cost over 1,000 nodes (µs): {result['pick_us']}")
        if "overhead" not in skip:
            rows = overhead(home, root, args.rounds, args.duration, data, wrk_bin)
            result["overhead"] = rows
            for c in (1, 64):
                for via in ("edgegen-gateway", "nginx"):
                    for pct in ("p50_us", "p99_us"):
                        med, lo, hi = added(rows, via, c, pct)
                        result.setdefault("added_ms", {})[f"{via} c{c} {pct[:3]}"] = [med, lo, hi]
                        console.print(f"added {pct[:3]} c{c} {via}: {med:.3f} ms ({lo:.3f}–{hi:.3f})")
        if "uneven" not in skip:
            rows = uneven(home, root, args.rounds, args.duration, data, wrk_bin)
            result["uneven"] = rows
            for (name, _), s in summarize(rows).items():
                console.print(
                    f"uneven {name}: {s['rps']:.0f} req/s, p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms"
                )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gateway-{stamp}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
