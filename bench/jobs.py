"""Jobs: how fast the queues take and hand out work, how long a trivial job takes end to end, and the
issue's crash run at full size.

queue     In process, SQLite (WAL) and Redis Streams (a redis-server started here, append-only file):
          submit N jobs (jobs/s), then claim + finish them all with one worker (jobs/s). Median of 3.
latency   A node (digits, auth off, 2 job workers) per backend: POST /v1/jobs for /predict, then GET
          it every 2 ms until it has succeeded; p50 / p90 over 100 jobs submitted one at a time.
crash     1,000 /predict jobs into a node (SQLite), SIGKILL once half have succeeded, start it again on
          the same home and wait: how many end succeeded (target: all 1,000, each once), and how long.

    python bench/jobs.py [--jobs 5000]

Results go to bench/results/jobs-<timestamp>.json, with a summary printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from edgegen.jobs.queue import JobQueue, JobRequest
from edgegen.jobs.redis import RedisJobQueue
from edgegen.jobs.sqlite import SqliteJobQueue
from predict import BIN, ensure_models
from servers import LIKE_BASELINES, Server, clean_env, free_port, new_result, save_result, start, stop

console = Console()
REQUEST = JobRequest("POST", "/predict", json.dumps({"input_data": [0.0] * 64}).encode())


def redis_server(root: Path) -> Server:
    port = free_port()
    command = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(root)]
    return Server("redis", command, clean_env(), "", port)


async def queue_rates(queue: JobQueue, n: int) -> dict[str, float]:
    started = time.perf_counter()
    for _ in range(n):
        await queue.submit("bench", REQUEST)
    submitted = time.perf_counter()
    while (job := await queue.claim("w", 60)) is not None:
        await queue.finish(job.id, "w", 200, b"{}")
    done = time.perf_counter()
    await queue.close()
    return {"submit_per_s": n / (submitted - started), "claim_finish_per_s": n / (done - submitted)}


def node(home: Path, name: str, jobs_env: dict[str, str], port: int | None = None) -> Server:
    port = port or free_port()
    command = [str(BIN / "edgegen"), "serve", "--port", str(port)]
    env = clean_env(EDGEGEN_HOME=str(home), **LIKE_BASELINES, **jobs_env)
    return Server(name, command, env, "/v2/health/ready", port)


def wait_done(client: httpx.Client, job_id: str, interval: float = 0.002) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(interval)


def latency(server: Server, count: int = 100) -> dict[str, float]:
    samples = []
    order = {"method": "POST", "url": "/predict", "body": {"input_data": [0.0] * 64}}
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for _ in range(count):
            started = time.perf_counter()
            job = client.post("/v1/jobs", json=order).json()
            assert wait_done(client, job["id"])["status"] == "succeeded"
            samples.append((time.perf_counter() - started) * 1000)
    deciles = statistics.quantiles(samples, n=10)
    return {"p50_ms": statistics.median(samples), "p90_ms": deciles[-1], "min_ms": min(samples)}


def crash(home: Path, root: Path, total: int = 1000) -> dict[str, Any]:
    jobs_env = {"EDGEGEN_JOBS__PATH": str(root / "crash.sqlite"), "EDGEGEN_JOBS__LEASE_S": "2"}
    first = node(home, "crash-1", jobs_env)
    start(first, root)
    order = {"method": "POST", "url": "/predict", "body": {"input_data": [0.0] * 64}}
    with httpx.Client(base_url=first.base_url, timeout=30) as client:
        ids = [client.post("/v1/jobs", json=order).json()["id"] for _ in range(total)]
        while client.get(f"/v1/jobs/{ids[total // 2]}").json()["status"] != "succeeded":
            time.sleep(0.005)
    assert first.process is not None
    os.killpg(first.process.pid, signal.SIGKILL)  # a crash: no graceful shutdown
    first.process.wait()
    killed_at = time.perf_counter()
    second = node(home, "crash-2", jobs_env, port=first.port)
    start(second, root)
    try:
        with httpx.Client(base_url=second.base_url, timeout=30) as client:
            final = [wait_done(client, job_id, 0.01) for job_id in ids]
    finally:
        stop(second)
    statuses = [job["status"] for job in final]
    return {
        "submitted": total,
        "succeeded": statuses.count("succeeded"),
        "other": len(statuses) - statuses.count("succeeded"),
        "max_attempts": max(job["attempts"] for job in final),
        "drained_after_kill_s": time.perf_counter() - killed_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    args = parser.parse_args()
    result = new_result()
    with tempfile.TemporaryDirectory(prefix="edgegen-jobs-bench-") as tmp:
        root = Path(tmp)
        home = root / "home"
        ensure_models(home)
        redis = redis_server(root)
        start(redis, root)
        time.sleep(0.3)
        try:
            url = f"redis://127.0.0.1:{redis.port}/0"
            for name, make in (("sqlite", lambda i: SqliteJobQueue(root / f"q{i}.sqlite")),
                               ("redis", lambda i: RedisJobQueue(url, prefix=f"bench{i}:"))):  # fmt: skip
                runs = [asyncio.run(queue_rates(make(i), args.jobs)) for i in range(3)]
                result.setdefault("queue", {})[name] = {
                    k: statistics.median(r[k] for r in runs) for k in ("submit_per_s", "claim_finish_per_s")
                }
                console.print(f"queue {name}: {result['queue'][name]}")
            backends = {
                "sqlite": {"EDGEGEN_JOBS__PATH": str(root / "lat.sqlite")},
                "redis": {"EDGEGEN_JOBS__BACKEND": "redis", "EDGEGEN_JOBS__REDIS_URL": url},
            }
            for name, env in backends.items():
                server = node(home, f"node-{name}", env)
                start(server, root)
                try:
                    result.setdefault("latency", {})[name] = latency(server)
                finally:
                    stop(server)
                console.print(f"latency {name}: {result['latency'][name]}")
        finally:
            stop(redis)
        result["crash"] = crash(home, root)
        console.print(f"crash: {result['crash']}")
    console.print(f"results: {save_result('jobs', result)}")


if __name__ == "__main__":
    main()
