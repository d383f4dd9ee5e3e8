"""Benchmark prompt-lookup drafts (`engine/lookup.py`): where they should pay, and where they should not.

SmolLM2-135M-Instruct Q4_1, 2 llama.cpp threads, greedy, one `edgegen serve` per system:

    drafts  EDGEGEN_LLM__SPECULATIVE_TOKENS=4 (the default): drafts where the step cost says they pay
    none    EDGEGEN_LLM__SPECULATIVE_TOKENS=0

Workloads (chats: a 5-digit reference opens each system message, so no two share a cached prefix beyond
the template's header; edits and summaries: the template's default system message, then the passage):

    edit-1     1 stream: copy a ~90-token passage with one word replaced (SmolLM2 copies it, then goes on)
    summary-1  1 stream: summarise a passage, quoting it
    chat-1     1 stream: a free question, 128 tokens (`ignore_eos`)
    edit-4     4 streams at once, each editing its own passage
    chat-8     8 streams at once, free questions, 128 tokens each

Rounds alternate the systems (A B, B A, …); both get the same requests in a round, and since drafts
must not change an answer, their answers are compared: the table says how many were identical.
Reported per system and workload: aggregate tok/s (all completion tokens ÷ first request sent → last
token received) and per-stream decode tok/s, medians over rounds with min–max, and the ratio
drafts ÷ none of the same round.

    .venv/bin/python bench/speculative.py [--rounds 3] [--source-home DIR]

Results go to bench/results/speculative-<timestamp>.json; the Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from llm import MODEL, N_BATCH, N_CTX, Refs, prepare_home
from llm_client import Wave, chat_body, new_client, wave
from servers import LIKE_BASELINES, Server, clean_env, free_port, new_result, save_result, start, stop

BIN = Path(sys.executable).parent
THREADS, MAX_NUM_SEQS = 2, 8
SYSTEMS = {"drafts": 4, "none": 0}
PASSAGES = (
    "Edge nodes serve small language models close to their users. A node keeps one model in memory, "
    "batches the requests that arrive together, and streams each answer token by token. When the "
    "network to the data centre fails, the node keeps answering, and it ships its logs once the link "
    "is back. Operators upgrade a node remotely; if the new version fails its health check, the node "
    "rolls back to the version that worked.",
    "The warehouse opens at six in the morning. The first shift checks the cold rooms, records their "
    "temperatures and unloads the trucks that arrived during the night. Every pallet is scanned before "
    "it is stored, and a pallet whose label cannot be read is set aside for the supervisor. The second "
    "shift prepares the orders for the afternoon deliveries.",
    "Our library lends books, films and music to anyone who lives in the town. A card is free and is "
    "ready in a few minutes at the front desk. Members may borrow up to ten items for three weeks and "
    "renew them twice, online or by phone, unless another member has reserved them. Late returns are "
    "not fined, but a member with overdue items cannot borrow more.",
    "The train leaves the coast in the early morning and climbs slowly through the vineyards. After the "
    "second tunnel the valley opens and the river appears far below, green and quiet. Most travellers "
    "get off at the old market town, where the station clock has stood still for years, and walk up "
    "the hill to the castle before the heat of the day.",
)
EDITS = (("node", "device"), ("pallet", "crate"), ("member", "reader"), ("train", "bus"))
QUESTIONS = (
    "Write a short poem about the sea and the wind.",
    "Give me three ideas for a rainy weekend.",
    "Explain why the sky is blue to a child.",
    "What should I pack for a week of hiking?",
)
# workload: (streams, what each asks for, max_tokens, ignore_eos)
WORKLOADS: dict[str, tuple[int, str, int, bool]] = {
    "edit-1": (1, "edit", 256, False),
    "summary-1": (1, "summary", 160, False),
    "chat-1": (1, "chat", 128, True),
    "edit-4": (4, "edit", 256, False),
    "chat-8": (8, "chat", 128, True),
}


def server(name: str, drafts: int, home: Path) -> Server:
    port = free_port()
    env = clean_env(
        EDGEGEN_HOME=str(home),
        EDGEGEN_LLM__THREADS=str(THREADS),
        EDGEGEN_LLM__MAX_NUM_SEQS=str(MAX_NUM_SEQS),
        EDGEGEN_LLM__CTX_PER_SEQ=str(N_CTX),
        EDGEGEN_LLM__N_BATCH=str(N_BATCH),
        EDGEGEN_LLM__SPECULATIVE_TOKENS=str(drafts),
        **LIKE_BASELINES,
    )
    command = [str(BIN / "edgegen"), "serve", "--port", str(port)]
    return Server(name, command, env, "/v2/health/ready", port, model=MODEL)


def bodies(workload: str, refs: Refs) -> list[dict[str, Any]]:
    streams, task, max_tokens, ignore_eos = WORKLOADS[workload]
    out = []
    for i in range(streams):
        passage, (old, new) = PASSAGES[i % len(PASSAGES)], EDITS[i % len(EDITS)]
        if task == "chat":
            system = f"Ref {refs.take()}. You are a helpful assistant."
            question = QUESTIONS[i % len(QUESTIONS)]
            out.append({**chat_body(MODEL, system, question, max_tokens), "ignore_eos": ignore_eos})
            continue
        # The template's own system message: with it SmolLM2 copies the passage before editing it (with
        # a system message of ours it writes a shorter text of its own); the passages differ per stream.
        user = {
            "edit": f"Copy the following text exactly, but replace the word '{old}' with '{new}':"
            f"\n\n{passage}",
            "summary": f"Summarise the following text, quoting its key sentences:\n\n{passage}",
        }[task]
        body = chat_body(MODEL, "", user, max_tokens)
        body["messages"] = [{"role": "user", "content": user}]
        out.append({**body, "ignore_eos": ignore_eos})
    return out


def row(system: str, workload: str, round_no: int, result: Wave) -> dict[str, Any]:
    return {
        "system": system,
        "workload": workload,
        "round": round_no,
        "aggregate_tps": result.aggregate_tps,
        "decode_tps": [s.decode_tps for s in result.streams],
        "tokens": [s.tokens for s in result.streams],
        "texts": ["".join(s.text) for s in result.streams],
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def find(system: str, workload: str, round_no: int) -> dict[str, Any] | None:
        return next(
            (r for r in rows if (r["system"], r["workload"], r["round"]) == (system, workload, round_no)),
            None,
        )

    table = []
    for workload in WORKLOADS:
        rounds = sorted({r["round"] for r in rows if r["workload"] == workload})
        pairs = []
        for n in rounds:
            a, b = find("drafts", workload, n), find("none", workload, n)
            if a is not None and b is not None:
                pairs.append((a, b))
        same = sum(x == y for a, b in pairs for x, y in zip(a["texts"], b["texts"], strict=True))
        answers = sum(len(a["texts"]) for a, _ in pairs)
        for system in SYSTEMS:
            mine = [r for r in rows if r["system"] == system and r["workload"] == workload]
            tps = [r["aggregate_tps"] for r in mine]
            decode = [statistics.median(r["decode_tps"]) for r in mine]
            table.append(
                {
                    "system": system,
                    "workload": workload,
                    "tps": statistics.median(tps),
                    "tps_range": (min(tps), max(tps)),
                    "decode_tps": statistics.median(decode),
                    "decode_range": (min(decode), max(decode)),
                    "tokens": statistics.median(t for r in mine for t in r["tokens"]),
                }
            )
        ratios = [a["aggregate_tps"] / b["aggregate_tps"] for a, b in pairs]
        table[-2]["ratio"] = (statistics.median(ratios), min(ratios), max(ratios))
        table[-2]["identical"] = f"{same}/{answers}"
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | system | aggregate tok/s (min–max) | stream decode tok/s (min–max) | tokens "
        "| drafts ÷ none (min–max) | identical answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in table:
        low, high = t["tps_range"]
        dlow, dhigh = t["decode_range"]
        ratio = "{:.2f} ({:.2f}–{:.2f})".format(*t["ratio"]) if "ratio" in t else ""
        lines.append(
            f"| {t['workload']} | {t['system']} | {t['tps']:.1f} ({low:.1f}–{high:.1f}) | "
            f"{t['decode_tps']:.1f} ({dlow:.1f}–{dhigh:.1f}) | {t['tokens']:.0f} | {ratio} | "
            f"{t.get('identical', '')} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace, home: Path) -> list[dict[str, Any]]:
    prepare_home(home, args.source_home)
    refs, rows, logs = Refs(), [], home / "logs"
    logs.mkdir(exist_ok=True)
    for round_no in range(1, args.rounds + 1):
        requests = {workload: bodies(workload, refs) for workload in WORKLOADS}
        order = list(SYSTEMS) if round_no % 2 else list(reversed(SYSTEMS))
        for name in order:
            node = server(name, SYSTEMS[name], home)
            start(node, logs)
            try:
                async with new_client(16) as client:
                    url = f"http://127.0.0.1:{node.port}/v1/chat/completions"
                    await wave(client, url, bodies("chat-1", refs))  # warm-up, not counted
                    for workload, sent in requests.items():
                        rows.append(row(name, workload, round_no, await wave(client, url, sent)))
                        print(
                            f"round {round_no} {name:6s} {workload:9s} {rows[-1]['aggregate_tps']:6.1f} tok/s"
                        )
            finally:
                stop(node)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source-home", type=Path, default=None, help="an EDGEGEN_HOME with the model")
    args = parser.parse_args()
    result = new_result()
    with tempfile.TemporaryDirectory(prefix="bench-speculative-") as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    table = summarize(rows)
    out = save_result("speculative", {**result, "rows": rows, "table": table})
    print(markdown(table))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
