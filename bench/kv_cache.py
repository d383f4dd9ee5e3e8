"""Benchmark the KV cache's element type: f16 against llama.cpp's q8_0 and q4_0 (`[llm] kv_type`).

What it measures, for SmolLM2-135M-Instruct Q4_1 (the store's `smollm2-135m`) on 2 llama.cpp threads, with
`LlamaExecutor` and our `Scheduler` in process (what a node runs, without HTTP):

    memory      bytes per KV cell, the pool the default budget buys, and the RSS of a child
                process that loaded the model with a pool of 8 x 2048 cells (every slot's whole context)
    tok/s       greedy, 128 new tokens, 1 stream and 8 streams started at once (aggregate tokens ÷ time),
                the same pool of 4096 cells for every type, so only the element type differs
    perplexity  the `lm` task's held-out text (stdlib docstrings), llama.cpp's method (`Scorer`):
                chunks of 512 tokens, the second half of each scored
    agreement   16 prompts cut from the held-out text, 64 greedy tokens each against f16's: answers
                identical, and mean tokens before the first difference

Rounds interleave the types (f16, q8_0, q4_0, f16, …) so machine noise hits all alike.

    .venv/bin/python bench/kv_cache.py [--rounds 3] [--chunks 16] [--source-home DIR]

Results go to bench/results/kv-<date>.json; a Markdown report ready to paste is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgegen.config import KvType, LlmSettings
from edgegen.engine.generation import Scheduler
from edgegen.engine.sampling import SamplingParams
from edgegen.executors.llamacpp import AUTO_KV_BYTES, KV_BYTES, LlamaExecutor, kv_cells
from edgegen.optimize.lm import Scorer, heldout_text
from llm import prepare_home
from servers import new_result, save_result

TYPES: tuple[KvType, ...] = ("f16", "q8_0", "q4_0")
THREADS = 2
NEW_TOKENS = 128
POOL_CELLS = 4096
GREEDY = SamplingParams(temperature=0)

# A child that loads the model with every slot's whole context and reports its RSS (kB) and the pool.
_RSS_CHILD = """
import sys
from pathlib import Path
from edgegen.config import LlmSettings
from edgegen.executors.llamacpp import LlamaExecutor
settings = LlmSettings(max_num_seqs=8, ctx_per_seq=2048, threads=2, kv_type=sys.argv[2], kv_budget_mb=4096)
executor = LlamaExecutor(Path(sys.argv[1]), settings)
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
print(rss, executor.n_cells)
"""


def values_per_cell(model: Path) -> float:
    """K and V values one cell holds for this model (the f16 executor's bytes per cell, halved)."""
    executor = LlamaExecutor(model, LlmSettings(max_num_seqs=1, ctx_per_seq=256, threads=THREADS))
    try:
        return executor.kv_bytes_per_cell / KV_BYTES["f16"]
    finally:
        executor.close()


async def generate(
    model: Path, kv_type: KvType, values: float, prompts: list[list[int]], new_tokens: int
) -> tuple[float, list[list[int]]]:
    """Run the prompts at once through one scheduler; return the aggregate tok/s and each answer's tokens."""
    budget = POOL_CELLS * values * KV_BYTES[kv_type] / (1 << 20)
    settings = LlmSettings(
        max_num_seqs=8, ctx_per_seq=2048, n_batch=512, threads=THREADS, kv_type=kv_type, kv_budget_mb=budget
    )
    executor = LlamaExecutor(model, settings)
    scheduler = Scheduler("bench", executor, max_num_seqs=8, n_batch=512)
    scheduler.start()
    answers = ["" for _ in prompts]
    counts = [0 for _ in prompts]

    async def one(i: int, prompt: list[int]) -> None:
        generation = scheduler.submit(prompt, GREEDY, max_tokens=new_tokens, stop=[], timeout_s=600)
        async for event in generation.events():
            answers[i] += event.text
        counts[i] = generation.usage.completion_tokens

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        seconds = time.perf_counter() - started
        return sum(counts) / seconds, [executor.tokenize(a, special=False) for a in answers]
    finally:
        await scheduler.close()


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    same = sum(a == b for a, b in zip(reference, other, strict=True)) / len(reference)
    prefixes = []
    for a, b in zip(reference, other, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefixes.append(n)
    return same, statistics.mean(prefixes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=16, help="perplexity chunks of 512 tokens")
    parser.add_argument("--source-home", type=Path, help="an EDGEGEN_HOME that has smollm2-135m")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-kv-"))
    model = prepare_home(home, args.source_home)

    with Scorer(model, 512, THREADS) as scorer:
        tokens = scorer.tokenize(heldout_text())
    values = values_per_cell(model)
    chat = tokens[:100]
    prompts = [tokens[5000 + 300 * i : 5000 + 300 * i + 96] for i in range(16)]
    results: dict[str, dict[str, Any]] = {t: {"tps1": [], "tps8": []} for t in TYPES}
    for kv_type in TYPES:
        out = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(model), kv_type],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        results[kv_type]["rss_full_mb"] = round(int(out[0]) / 1024, 1)
        results[kv_type]["full_cells"] = int(out[1])
        per_cell = values * KV_BYTES[kv_type]
        results[kv_type]["bytes_per_cell"] = per_cell
        default = LlmSettings(kv_type=kv_type)
        results[kv_type]["default_cells"] = kv_cells(default, per_cell, 2048)
        with Scorer(model, 512, THREADS, kv_type=kv_type) as scorer:
            results[kv_type]["perplexity"] = scorer.perplexity(tokens, args.chunks)
        results[kv_type]["answers"] = asyncio.run(generate(model, kv_type, values, prompts, 64))[1]
        row = results[kv_type]
        print(f"{kv_type}: perplexity {row['perplexity']:.4f}, RSS {row['rss_full_mb']} MB", flush=True)
    for r in range(args.rounds):
        for kv_type in TYPES:
            one = asyncio.run(generate(model, kv_type, values, [chat], NEW_TOKENS))[0]
            eights = [[1000 + i, *chat] for i in range(8)]  # distinct first tokens: no shared prefix
            eight = asyncio.run(generate(model, kv_type, values, eights, NEW_TOKENS))[0]
            results[kv_type]["tps1"].append(one)
            results[kv_type]["tps8"].append(eight)
            print(f"round {r + 1} {kv_type}: {one:.1f} tok/s alone, {eight:.1f} tok/s at 8", flush=True)

    reference = results["f16"]
    lines = [
        f"SmolLM2-135M Q4_1, {THREADS} threads, {args.rounds} rounds; perplexity over {args.chunks} "
        f"chunks of 512 tokens; default budget {AUTO_KV_BYTES >> 20} MB",
        "",
        "| KV type | bytes/cell | cells by default | RSS, 8 × 2048 cells | perplexity (Δ vs f16) | "
        "greedy: same answers, mean agreeing tokens | tok/s 1 stream | tok/s 8 streams |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kv_type in TYPES:
        row = results[kv_type]
        delta = (row["perplexity"] / reference["perplexity"] - 1) * 100
        same, agree = agreement(reference["answers"], row["answers"])
        row.update(same_answers=same, agreeing_tokens=agree, ppl_delta_pct=delta)

        def spread(samples: list[float]) -> str:
            return f"{statistics.median(samples):.1f} ({min(samples):.1f}–{max(samples):.1f})"

        lines.append(
            f"| {kv_type} | {row['bytes_per_cell']:,.0f} | {row['default_cells']:,} | "
            f"{row['rss_full_mb']} MB | "
            f"{row['perplexity']:.3f} ({delta:+.2f} %) | {same * 100:.0f} %, {agree:.1f} of 64 | "
            f"{spread(row['tps1'])} | {spread(row['tps8'])} |"
        )
    record = new_result()
    record["results"] = {t: {k: v for k, v in r.items() if k != "answers"} for t, r in results.items()}
    print(f"saved {save_result('kv', record)}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
