"""Benchmark what a chat user feels while other streams come and go: the step budget against none.

Issue 17's workloads, SmolLM2-135M-Instruct Q4_1, 2 llama.cpp threads, a ~118-token prompt of its own
per request (a 5-digit ticket number opens the system message, so no prefix is shared), 128 new tokens
with `ignore_eos` (every answer has the same length):

    together   8 streams started at once
    staggered  4 streams started 1 s apart
    single     1 stream
    sampled    8 streams at once, temperature 0.8, top-p 0.95 (against `together`, which is greedy)

Systems, one `edgegen serve` each, started one at a time and stopped before the next:

    budget     EDGEGEN_LLM__ITL_TARGET_MS=75 (the default): prompts are chunked beside running streams
    no-budget  EDGEGEN_LLM__ITL_TARGET_MS=0: a prompt takes up to n_batch (512) tokens of a step
    ceiling    a bare loop over llama.cpp's batch API in this process (bench/llm_inprocess.py): the N
               prompts prefilled together, then decoded together, argmax, no HTTP

Rounds alternate the servers (A B A B …): each round starts both servers in turn and runs every workload
on each, then the ceiling. Reported per system and workload: ITL p50 / p99 (gaps between content chunks
of all streams of all rounds), TTFT p50 / p99, aggregate tok/s (median and min–max over rounds; all
tokens ÷ first request sent → last token received), and the ratio to the same round's ceiling of as
many streams (the ceiling's TTFT is call → first token, all prompts at once: for `staggered`, whose
prompts arrive alone, compare its TTFT with the ceiling's `single`).

    .venv/bin/python bench/streams.py [--rounds 3] [--source-home DIR]

Results go to bench/results/streams-<timestamp>.json; the Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edgegen.config import LlmSettings
from llm import MODEL, N_BATCH, N_CTX, SYSTEM, USER, Refs, prepare_home
from llm_client import Stream, Wave, chat_body, new_client, stream_chat
from llm_inprocess import Ceiling, InProcessRun
from servers import LIKE_BASELINES, Server, clean_env, free_port, machine_facts, start, stop

BENCH = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
THREADS, MAX_NUM_SEQS, NEW_TOKENS = 2, 8, 128
SYSTEMS = {"budget": 75, "no-budget": 0}
# workload: (streams, seconds between starts, sampling fields)
WORKLOADS: dict[str, tuple[int, float, dict[str, Any]]] = {
    "together": (8, 0.0, {}),
    "staggered": (4, 1.0, {}),
    "single": (1, 0.0, {}),
    "sampled": (8, 0.0, {"temperature": 0.8, "top_p": 0.95, "seed": 1}),
}


def server(name: str, itl_target_ms: int, home: Path) -> Server:
    port = free_port()
    env = clean_env(
        EDGEGEN_HOME=str(home),
        EDGEGEN_LLM__THREADS=str(THREADS),
        EDGEGEN_LLM__MAX_NUM_SEQS=str(MAX_NUM_SEQS),
        EDGEGEN_LLM__CTX_PER_SEQ=str(N_CTX),
        EDGEGEN_LLM__N_BATCH=str(N_BATCH),
        EDGEGEN_LLM__ITL_TARGET_MS=str(itl_target_ms),
        **LIKE_BASELINES,
    )
    command = [str(BIN / "edgegen"), "serve", "--port", str(port)]
    return Server(name, command, env, "/v2/health/ready", port, model=MODEL)


async def run_wave(client: httpx.AsyncClient, url: str, refs: Refs, workload: str) -> Wave:
    streams, gap_s, sampling = WORKLOADS[workload]
    bodies = []
    for _ in range(streams):
        body = chat_body(MODEL, SYSTEM.format(ref=refs.take()), USER, NEW_TOKENS)
        bodies.append({**body, **sampling, "ignore_eos": True})
    started = time.perf_counter()

    async def one(i: int) -> Stream:
        await asyncio.sleep(i * gap_s)
        return await stream_chat(client, url, bodies[i])

    return Wave(started, list(await asyncio.gather(*(one(i) for i in range(streams)))))


def ceiling_run(
    ceiling: Ceiling, tokenize: Callable[[str], list[int]], refs: Refs, streams: int
) -> InProcessRun:
    prompts = [tokenize(SYSTEM.format(ref=refs.take())) for _ in range(streams)]
    return ceiling.run(prompts, NEW_TOKENS)


def wave_row(system: str, workload: str, round_no: int, result: Wave) -> dict[str, Any]:
    return {
        "system": system,
        "workload": workload,
        "round": round_no,
        "aggregate_tps": result.aggregate_tps,
        "ttft_s": [s.ttft_s for s in result.streams],
        "gaps_s": [g for s in result.streams for g in s.gaps_s],
        "tokens": [s.tokens for s in result.streams],
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ceilings = {(r["workload"], r["round"]): r["aggregate_tps"] for r in rows if r["system"] == "ceiling"}
    table = []
    for system in [*SYSTEMS, "ceiling"]:
        for workload in WORKLOADS:
            mine = [r for r in rows if r["system"] == system and r["workload"] == workload]
            if not mine:
                continue
            tps = [r["aggregate_tps"] for r in mine]
            ratios = [r["aggregate_tps"] / ceilings[(workload, r["round"])] for r in mine]
            gaps = [g for r in mine for g in r.get("gaps_s", [])]
            ttft = [t for r in mine for t in r.get("ttft_s", [])]
            table.append(
                {
                    "system": system,
                    "workload": workload,
                    "itl_p50_ms": 1000 * float(np.percentile(gaps, 50)) if gaps else None,
                    "itl_p99_ms": 1000 * float(np.percentile(gaps, 99)) if gaps else None,
                    "ttft_p50_ms": 1000 * float(np.percentile(ttft, 50)) if ttft else None,
                    "ttft_p99_ms": 1000 * float(np.percentile(ttft, 99)) if ttft else None,
                    "tps": statistics.median(tps),
                    "tps_range": (min(tps), max(tps)),
                    "of_ceiling": statistics.median(ratios),
                    "of_ceiling_range": (min(ratios), max(ratios)),
                }
            )
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:,.0f}"

    lines = [
        "| system | workload | ITL p50 / p99 ms | TTFT p50 / p99 ms | aggregate tok/s (min–max) "
        "| ÷ ceiling (min–max) |",
        "|---|---|---|---|---|---|",
    ]
    for t in table:
        low, high = t["tps_range"]
        rlow, rhigh = t["of_ceiling_range"]
        lines.append(
            f"| {t['system']} | {t['workload']} | {ms(t['itl_p50_ms'])} / {ms(t['itl_p99_ms'])} | "
            f"{ms(t['ttft_p50_ms'])} / {ms(t['ttft_p99_ms'])} | {t['tps']:.1f} ({low:.1f}–{high:.1f}) | "
            f"{t['of_ceiling']:.2f} ({rlow:.2f}–{rhigh:.2f}) |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace, home: Path) -> list[dict[str, Any]]:
    model_file = prepare_home(home, args.source_home)
    settings = LlmSettings(threads=THREADS, max_num_seqs=MAX_NUM_SEQS, ctx_per_seq=N_CTX, n_batch=N_BATCH)
    ceiling = Ceiling(model_file, settings)

    def tokenize(system: str) -> list[int]:
        chat = [{"role": "system", "content": system}, {"role": "user", "content": USER}]
        return ceiling.executor.tokenize(ceiling.executor.render_chat(chat), special=True)

    refs, rows, logs = Refs(), [], home / "logs"
    logs.mkdir(exist_ok=True)
    for round_no in range(1, args.rounds + 1):
        order = list(SYSTEMS) if round_no % 2 else list(reversed(SYSTEMS))
        for name in order:
            node = server(name, SYSTEMS[name], home)
            start(node, logs)
            try:
                async with new_client(16) as client:
                    url = f"http://127.0.0.1:{node.port}/v1/chat/completions"
                    await run_wave(client, url, refs, "single")  # warm-up, not counted
                    for workload in WORKLOADS:
                        row = wave_row(name, workload, round_no, await run_wave(client, url, refs, workload))
                        rows.append(row)
                        print(f"round {round_no} {name:9s} {workload:9s} {row['aggregate_tps']:6.1f} tok/s")
            finally:
                stop(node)
        for n in sorted({streams for streams, _, _ in WORKLOADS.values()}):
            result = ceiling_run(ceiling, tokenize, refs, n)
            for workload, (streams, _, _) in WORKLOADS.items():
                if streams == n:  # each workload against the ceiling of as many streams
                    rows.append(
                        {
                            "system": "ceiling",
                            "workload": workload,
                            "round": round_no,
                            "aggregate_tps": result.aggregate_tps,
                            "ttft_s": result.ttft_s,
                        }
                    )
            print(f"round {round_no} ceiling   {n} streams {result.aggregate_tps:6.1f} tok/s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source-home", type=Path, default=None, help="an EDGEGEN_HOME with the model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    table = summarize(rows)
    out = BENCH / "results" / f"streams-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    facts = {"machine": machine_facts(), "command": " ".join(sys.argv), "date": datetime.now(UTC).isoformat()}
    out.write_text(json.dumps({**facts, "rows": rows, "table": table}, indent=1))
    print(markdown(table))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
