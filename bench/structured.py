"""Benchmark structured output: JSON-schema answers against free text on the same node, A B in one run.

SmolLM2-135M-Instruct Q4_1 (`edgegen serve`, 2 llama.cpp threads, 8 slots, default `[llm]`), 8 concurrent
clients, `--requests` chats per round per mode, each with a question and, in `schema` mode, a schema of
its own (an enum only that request may answer, an integer, a list of at most 3 booleans, an object of two
strings). Rounds alternate the modes (free, schema, free, schema, …). Reported per mode: requests, the
share of answers that end by themselves and parse and validate against their schema (schema mode), and
aggregate completion tok/s (median and min–max over rounds). The checker is the tests'
(tests/json_shapes.py).

    .venv/bin/python bench/structured.py [--rounds 3] [--requests 200] [--source-home DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.json_shapes import conforms

from llm import MODEL, prepare_home
from servers import LIKE_BASELINES, Server, clean_env, free_port, start, stop

BIN = Path(sys.executable).parent
CLIENTS = 8


def schema_for(i: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "answer": {"enum": [f"yes-{i}", f"no-{i}"]},
            "count": {"type": "integer"},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
            "who": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "city": {"type": "string", "maxLength": 24},
                },
                "required": ["name", "city"],
                "additionalProperties": False,
            },
        },
        "required": ["answer", "count", "flags", "who"],
        "additionalProperties": False,
    }


def body(i: int, shaped: bool) -> dict[str, Any]:
    question = f"Ticket {i}: who reported the broken rain gauge, in which city, and is it fixed?"
    data: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 160,
        "temperature": 0.7,
        "seed": i,
    }
    if shaped:
        data["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": f"t{i}", "schema": schema_for(i)},
        }
    return data


async def run_mode(url: str, requests: int, shaped: bool, first: int) -> dict[str, Any]:
    valid, tokens, failures = 0, 0, []
    queue = list(range(first, first + requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal valid, tokens
        while queue:
            i = queue.pop()
            answer = (await client.post(url, json=body(i, shaped))).json()
            tokens += answer["usage"]["completion_tokens"]
            choice = answer["choices"][0]
            if not shaped:
                continue
            ok = False
            if choice["finish_reason"] == "stop":
                with contextlib.suppress(ValueError):  # not JSON: not valid
                    ok = conforms(json.loads(choice["message"]["content"]), schema_for(i))
            valid += ok
            if not ok:
                failures.append(
                    {
                        "request": i,
                        "finish_reason": choice["finish_reason"],
                        "text": choice["message"]["content"],
                    }
                )

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - started
    return {"tok_s": tokens / elapsed, "valid": valid, "requests": requests, "failures": failures}


async def run(args: argparse.Namespace, home: Path) -> dict[str, list[dict[str, Any]]]:
    prepare_home(home, args.source_home)
    port = free_port()
    env = clean_env(EDGEGEN_HOME=str(home), EDGEGEN_LLM__THREADS="2", **LIKE_BASELINES)
    node = Server(
        "edgegen", [str(BIN / "edgegen"), "serve", "--port", str(port)], env, "/v2/health/ready", port
    )
    (home / "logs").mkdir(exist_ok=True)
    start(node, home / "logs")
    results: dict[str, list[dict[str, Any]]] = {"free": [], "schema": []}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        first = 0
        for round_no in range(args.rounds):
            for mode in ("free", "schema") if round_no % 2 == 0 else ("schema", "free"):
                result = await run_mode(url, args.requests, mode == "schema", first)
                first += args.requests
                results[mode].append(result)
                shares = f"valid {result['valid']}/{result['requests']}"
                print(f"round {round_no + 1} {mode:6s} {result['tok_s']:6.1f} tok/s  {shares}")
                for failure in result["failures"]:
                    print(f"  not valid: {json.dumps(failure)}")
    finally:
        stop(node)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--source-home", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    for mode, rows in results.items():
        rates = [r["tok_s"] for r in rows]
        valid = sum(r["valid"] for r in rows)
        total = sum(r["requests"] for r in rows)
        share = f", valid {valid}/{total}" if mode == "schema" else ""
        print(f"{mode}: {statistics.median(rates):.1f} tok/s ({min(rates):.1f}–{max(rates):.1f}){share}")
    ratios = [s["tok_s"] / f["tok_s"] for s, f in zip(results["schema"], results["free"], strict=True)]
    print(f"schema ÷ free tok/s: {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})")


if __name__ == "__main__":
    main()
