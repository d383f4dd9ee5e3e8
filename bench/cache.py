"""Response cache: what a hit costs, against the work a miss does.

llm      SmolLM2-135M (the default model) on a node with 2 llama.cpp threads; greedy chat, 32 tokens, one
         request at a time (httpx, kept-alive, latency as the client sees it). Each round asks 8 new
         prompts once (misses), then each of them 5 times more (memory hits). Then wrk asks one of the
         prompts again and again for `--seconds` at concurrency 1 (bench/post.lua): the hit's latency
         without the Python client's own cost. Last the node restarts on the same home and every
         prompt is asked once more: hits from the disk tier.
predict  digits through wrk at concurrency 1 and 64, the node with its cache on (the 64 bodies repeat,
         so after the first pass every answer is a hit) against the same node with it off, A B A B.

    python bench/cache.py [--rounds 5] [--seconds 5]

Results go to bench/results/cache-<timestamp>.json, with a summary printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from llm import MODEL, prepare_home
from predict import BIN, alternate, digits_workload, ensure_wrk
from servers import LIKE_BASELINES, Server, clean_env, free_port, new_result, save_result, start, stop

console = Console()
PROMPTS_PER_ROUND = 8
HITS_PER_PROMPT = 5


def node(home: Path, name: str, cache: bool, extra: dict[str, str] | None = None) -> Server:
    port = free_port()
    command = [str(BIN / "edgegen"), "serve", "--port", str(port)]
    env = clean_env(EDGEGEN_HOME=str(home), EDGEGEN_ACCESS_LOG="false", **LIKE_BASELINES)
    env["EDGEGEN_CACHE__ENABLED"] = str(cache).lower()
    env.update(extra or {})
    return Server(name, command, env, "/v2/health/ready", port)


def chat(prompt: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32,
        "temperature": 0,
    }


def timed_chat(client: httpx.Client, prompt: str) -> tuple[float, str, str]:
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=chat(prompt))
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    return elapsed, response.headers["x-edgegen-cache"], response.json()["choices"][0]["message"]["content"]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def wrk_hits(server: Server, root: Path, prompt: str, seconds: int) -> dict[str, Any]:
    body = root / "chat.json"
    body.write_text(json.dumps(chat(prompt)))
    url = f"{server.base_url}/v1/chat/completions"
    command = [
        ensure_wrk(),
        "-t1",
        "-c1",
        f"-d{seconds}s",
        "-s",
        str(Path(__file__).parent / "post.lua"),
        url,
    ]
    done = subprocess.run([*command, "--", str(body)], capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    assert result["non_2xx"] == 0, result
    return result


def llm(root: Path, rounds: int, seconds: int) -> dict[str, Any]:
    home = root / "llm-home"
    prepare_home(home, Path.home() / ".local" / "share" / "edgegen")
    env = {"EDGEGEN_LLM__THREADS": "2", "EDGEGEN_LLM__MAX_NUM_SEQS": "4", "EDGEGEN_LLM__CTX_PER_SEQ": "2048"}
    server = node(home, "llm", True, env)
    start(server, root)
    rows, answers = [], {}
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            for round_no in range(rounds):
                prompts = [
                    f"Round {round_no}, question {i}: name a colour and a fruit."
                    for i in range(PROMPTS_PER_ROUND)
                ]
                misses, hits = [], []
                for prompt in prompts:
                    ms, state, text = timed_chat(client, prompt)
                    assert state == "miss", state
                    misses.append(ms)
                    answers[prompt] = text
                    for _ in range(HITS_PER_PROMPT):
                        ms, state, again = timed_chat(client, prompt)
                        assert (state, again) == ("hit", text), (state, again, text)
                        hits.append(ms)
                row = {"miss_p50_ms": statistics.median(misses), "hit_p50_ms": statistics.median(hits)}
                row["ratio"] = row["miss_p50_ms"] / row["hit_p50_ms"]
                rows.append(row)
                console.print(f"llm round {round_no}: {row}")
        hits_wrk = wrk_hits(server, root, next(iter(answers)), seconds)
        console.print(f"llm hits through wrk: {hits_wrk}")
    finally:
        stop(server)
    restarted = node(home, "llm-restarted", True, env)
    start(restarted, root)
    disk = []
    try:
        with httpx.Client(base_url=restarted.base_url, timeout=120) as client:
            for prompt, text in answers.items():
                ms, state, again = timed_chat(client, prompt)
                assert (state, again) == ("hit", text), (state, again, text)
                disk.append(ms)
    finally:
        stop(restarted)
    return {
        "rounds": rows,
        "miss_p50_ms": spread([r["miss_p50_ms"] for r in rows]),
        "hit_p50_ms": spread([r["hit_p50_ms"] for r in rows]),
        "ratio": spread([r["ratio"] for r in rows]),
        "wrk_hit": hits_wrk,
        "disk_hit_p50_ms": statistics.median(disk),
        "disk_hits": len(disk),
    }


def predict(root: Path, rounds: int, seconds: int) -> dict[str, Any]:
    home, data, wrk = digits_workload(root)
    servers = {"cache": node(home, "cache-on", True), "no-cache": node(home, "cache-off", False)}
    for server in servers.values():
        start(server, root)
    try:
        runs = alternate(wrk, servers, data, rounds, seconds, "predict")
    finally:
        for server in servers.values():
            stop(server)
    summary: dict[str, Any] = {}
    for concurrency in (1, 64):
        for name in servers:
            group = [r for r in runs if r["server"] == name and r["concurrency"] == concurrency]
            summary[f"{name} c{concurrency}"] = {
                "p50_ms": spread([r["p50_us"] / 1000 for r in group]),
                "rps": spread([r["correct_rps"] for r in group]),
            }
    return {"runs": runs, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    result = new_result()
    with tempfile.TemporaryDirectory(prefix="edgegen-cache-bench-") as tmp:
        root = Path(tmp)
        result["llm"] = llm(root, args.rounds, args.seconds)
        result["predict"] = predict(root, args.rounds, args.seconds)
    llm_result = result["llm"]
    console.print(
        f"llm: miss p50 {llm_result['miss_p50_ms']}, memory hit p50 {llm_result['hit_p50_ms']}, "
        f"ratio {llm_result['ratio']}, disk hit p50 {llm_result['disk_hit_p50_ms']:.3f} ms, "
        f"hit p50 through wrk {llm_result['wrk_hit']['p50_us']} µs"
    )
    for name, row in result["predict"]["summary"].items():
        console.print(f"predict {name}: {row}")
    console.print(f"results: {save_result('cache', result)}")


if __name__ == "__main__":
    main()
