"""Benchmark what idle KV cells cost the streams that run beside them (issue 17, item 2).

llama.cpp keeps every sequence's cells in one pool and attends, for every decoded token, to the whole
used part of it (other sequences' cells are masked, not skipped). An idle slot's cached prefix therefore
slows every running stream. The scheduler trims idle caches by a rule that needs one number, what a cell
costs a decoded token as a share of the token's own compute: `LlamaExecutor.cell_cost`, taken from the
model's shape (2·n_embd·n_layer / n_params). This measures the real figure to compare.

SmolLM2-135M-Instruct Q4_1, 2 llama.cpp threads, `LlamaExecutor` in process: N streams (1, 4) of 200
cached tokens each decode one token each, beside 0 to 2,048 idle cells held by other slots; the steps
are timed (median of 30 per setting, rounds interleaving the settings). Reported per stream count: the
step time for each count of idle cells, the cost per idle cell (the least-squares slope) as a share of a
decoded token's time (the step with no idle cells ÷ N), and the model's estimate beside it.

    .venv/bin/python bench/idle_cells.py [--rounds 3] [--source-home DIR]

Results go to bench/results/idle-cells-<timestamp>.json; the Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgegen.config import LlmSettings
from edgegen.executors.base import DecodeItem
from edgegen.executors.llamacpp import LlamaExecutor
from llm import prepare_home
from servers import new_result, save_result

THREADS, CONTEXT, STEPS = 2, 200, 30
IDLE = (0, 512, 1024, 2048)
STREAMS = (1, 4)
TEXT = (
    "Edge nodes serve small language models close to their users, batch the requests that arrive together "
    "and stream each answer token by token. "
) * 80


def step_ms(executor: LlamaExecutor, tokens: list[int], streams: int) -> float:
    """Median time of a decode step of one token for each of `streams` sequences (slots 0 … N-1)."""
    times = []
    for _ in range(STEPS):
        items = [DecodeItem(s, [tokens[CONTEXT]], CONTEXT, True) for s in range(streams)]
        start = time.perf_counter()
        executor.decode(items)
        times.append(time.perf_counter() - start)
        for s in range(streams):
            executor.forget(s, CONTEXT)
    return 1000 * statistics.median(times)


def hold_idle(executor: LlamaExecutor, tokens: list[int], cells: int, first_slot: int) -> None:
    """Fill slots from `first_slot` on with `cells` cells in all, as finished chats leave them."""
    for slot in range(first_slot, executor.n_seq):
        executor.forget(slot, 0)
    slot = first_slot
    while cells > 0:
        n = min(cells, executor.n_ctx_seq - 1, len(tokens))
        for start in range(0, n, 256):
            executor.decode([DecodeItem(slot, tokens[start : min(n, start + 256)], start, False)])
        cells -= n
        slot += 1


def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    model = prepare_home(home, args.source_home)
    settings = LlmSettings(threads=THREADS, max_num_seqs=8, ctx_per_seq=1024, kv_budget_mb=64)
    executor = LlamaExecutor(model, settings)
    tokens = executor.tokenize(TEXT, special=False)
    assert len(tokens) > 1024, "the text is too short to fill a slot"
    times: dict[tuple[int, int], list[float]] = {}
    try:
        for streams in STREAMS:
            for slot in range(streams):
                executor.forget(slot, 0)
                executor.decode([DecodeItem(slot, tokens[:CONTEXT], 0, False)])
            for round_no in range(args.rounds):
                order = IDLE if round_no % 2 == 0 else tuple(reversed(IDLE))
                for idle in order:
                    hold_idle(executor, tokens, idle, streams)
                    times.setdefault((streams, idle), []).append(step_ms(executor, tokens, streams))
                    print(f"{streams} streams, {idle:5d} idle cells: {times[(streams, idle)][-1]:6.2f} ms")
        estimate = executor.cell_cost
    finally:
        executor.close()
    table = []
    for streams in STREAMS:
        medians = [statistics.median(times[(streams, idle)]) for idle in IDLE]
        slope = float(np.polyfit(IDLE, medians, 1)[0])  # ms per idle cell per step
        per_token = medians[0] / streams
        table.append(
            {
                "streams": streams,
                "step_ms": dict(zip(IDLE, medians, strict=True)),
                "step_range": {
                    idle: (min(times[(streams, idle)]), max(times[(streams, idle)])) for idle in IDLE
                },
                "cell_share": slope / streams / per_token,  # of a decoded token's time, per idle cell
                "estimate": estimate,
            }
        )
    return {"table": table}


def markdown(table: list[dict[str, Any]]) -> str:
    head = " | ".join(f"{idle} idle: step ms (min–max)" for idle in IDLE)
    lines = [f"| streams | {head} | a cell's cost ÷ a token's (measured) | model's estimate |"]
    lines.append("|---" * (len(IDLE) + 3) + "|")
    for t in table:
        cells = " | ".join(
            f"{t['step_ms'][idle]:.1f} ({t['step_range'][idle][0]:.1f}–{t['step_range'][idle][1]:.1f})"
            for idle in IDLE
        )
        lines.append(
            f"| {t['streams']} | {cells} | 1/{1 / t['cell_share']:,.0f} | 1/{1 / t['estimate']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source-home", type=Path, default=None, help="an EDGEGEN_HOME with the model")
    args = parser.parse_args()
    result = new_result()
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        result.update(run(args, Path(tmp)))
    out = save_result("idle-cells", result)
    print(markdown(result["table"]))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
