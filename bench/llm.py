"""Benchmark LLM generation: our node against llama-cpp-python's server, its own loop and a batch-API ceiling.

What it measures. SmolLM2-135M-Instruct Q4_1 (the store's `smollm2-135m`, one GGUF file for every row),
2 llama.cpp threads, greedy, a ~120-token chat prompt (fixed system + user message), 128 new tokens, at
1, 4 and 8 concurrent streams:

    edgegen           `edgegen serve` (our continuous-batching scheduler), EDGEGEN_LLM__THREADS=2,
                      MAX_NUM_SEQS=8, CTX_PER_SEQ=2048, N_BATCH=512
    llama-cpp-server  `python -m llama_cpp.server --n_threads 2 --n_ctx 2048 --interrupt_requests False`
                      (one request at a time; the others wait their turn), its other settings default
    floor             llama-cpp-python in-process, `Llama.generate` greedy: the floor for ONE stream
    ceiling           a bare loop over llama.cpp's batch API (our LlamaExecutor, no scheduler, no HTTP):
                      N prompts prefilled together, then N sequences decoded together, argmax

How. Servers are started once per run, one at a time (start-to-ready time and memory are recorded). The
client is httpx (async) reading SSE: N streams are started at once (a "wave"); per request TTFT (request
sent → first content chunk) and decode tok/s ((tokens − 1) ÷ (last − first token time)); per wave the
aggregate tok/s (all tokens ÷ first request sent → last token received). Rounds interleave everything
(round 1: 1 stream on every system, 4 streams on every system, …; round 2: the same again) so machine
noise hits all alike; `--waves` waves per system and level in each round. Every request carries a
prompt of its own (the system message opens with a 5-digit ticket number, same token count), so no
server answers it from a prefix cache (ours reports, as "cached/req", the few tokens of the chat
template it still finds cached). Our API stops at the end token: a greedy answer that ends early is
counted as generated (tokens from `usage`), and flagged; the in-process rows ignore EOS.

Also: the prefix cache (a ~400-token system prompt, a cold request then one with the same system
prompt and another user message, TTFT warm ÷ cold; a fresh system prompt per pair), start-to-ready
time and RSS/PSS of both servers with the model loaded, and the memory-bandwidth bound of one stream
(GGUF tensor bytes per token against a single-threaded numpy copy).

    .venv/bin/python bench/llm.py [--rounds 3] [--waves 2] [--streams 1,4,8] [--new-tokens 128]
                                  [--prefix-pairs 5] [--source-home DIR] [--home DIR]

Results go to bench/results/llm-<timestamp>.json; a Markdown report ready to paste is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import psutil
from rich.console import Console

from edgegen.config import LlmSettings
from llm_client import Stream, Wave, chat_body, new_client, stream_chat, wave
from llm_inprocess import Ceiling, Floor, InProcessRun, copy_bandwidth, gguf_tensor_bytes
from llm_report import Summary, markdown, print_report, summarize, targets
from servers import (
    LIKE_BASELINES,
    Server,
    clean_env,
    free_port,
    home_dir,
    machine_facts,
    memory_of,
    start,
    stop,
)

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
MODEL = "smollm2-135m"
THREADS, N_CTX, MAX_NUM_SEQS, N_BATCH = 2, 2048, 8, 512
console = Console(width=None if sys.stdout.isatty() else 130)

# --- prompts ------------------------------------------------------------------------------------------------

SYSTEM = (
    "Ticket {ref}. You are a patient technical writer for a company that builds small weather stations. "
    "You explain things in plain words, in full sentences, with concrete examples, and you never stop early."
)
USER = (
    "Write a long, detailed guide for a new volunteer on how to install a weather station in a school "
    "garden: choosing the place, mounting the mast, wiring the sensors, calibrating the thermometer and the "
    "rain gauge, and checking the readings every week. Use several paragraphs and plain language, please."
)
LONG_SYSTEM = (
    "Site code {ref}. You are the support assistant of a company that designs, builds and services small "
    "automatic weather stations for schools, farms and villages. Each station has a mast of three metres, "
    "a solar panel of twenty watts, a lead-acid battery, a data logger with a cellular modem, and five "
    "sensors: air temperature and humidity in a ventilated shield, air pressure inside the logger box, "
    "wind speed and direction on a cross arm at the top of the mast, and a tipping-bucket rain gauge on "
    "its own post. The logger samples every ten seconds, keeps one-minute averages, and sends them every "
    "fifteen minutes; when the modem has no signal it stores up to thirty days and sends them later. "
    "Customers reach you by chat. Answer in plain words and short paragraphs. Ask for the station's serial "
    "number when it matters, and never guess it. When a reading looks wrong, first ask when the station "
    "was last cleaned and whether anything near it changed: a new building, a tree that has grown, a "
    "sprinkler, a car park. Typical faults are a blocked rain gauge funnel full of leaves, a temperature "
    "shield painted over or placed too close to a wall, a wind vane that lost its north alignment after a "
    "storm, a battery that no longer holds its charge after four or five winters, and a modem antenna "
    "loosened by the wind. Safety comes first: nobody climbs the mast alone, in rain or in wind above "
    "forty kilometres per hour, and the solar panel is disconnected before the battery is touched. Spare "
    "parts ship within two working days; the warranty covers three years from installation, not from "
    "purchase. Replies must never promise a visit by a technician; offer to open a ticket instead, and "
    "give the ticket number when you do. If the customer is a school, suggest the lesson plans on the "
    "education page, which explain each sensor with a small experiment that pupils can do in class."
)
PREFIX_USERS = (
    "The rain gauge has shown zero for two weeks although it rained twice. What should I check first?",
    "Our temperature readings are three degrees higher than the airport's every afternoon. Why?",
)


class Refs:
    """Unique 5-digit references that open the system message, so no two prompts share more than
    the chat template's header and a word or two. The counter is written backwards: consecutive
    requests differ in the first digit."""

    def __init__(self, first: int = 10000) -> None:
        self._next = first

    def take(self) -> str:
        self._next += 1
        return f"{self._next:05d}"[::-1]


# --- systems under test -------------------------------------------------------------------------------------


def define_servers(home: Path, model_file: Path) -> list[Server]:
    ours_port, theirs_port = free_port(), free_port()
    ours_env = clean_env(
        EDGEGEN_HOME=str(home),
        EDGEGEN_LLM__THREADS=str(THREADS),
        EDGEGEN_LLM__MAX_NUM_SEQS=str(MAX_NUM_SEQS),
        EDGEGEN_LLM__CTX_PER_SEQ=str(N_CTX),
        EDGEGEN_LLM__N_BATCH=str(N_BATCH),
        **LIKE_BASELINES,
    )
    ours = [str(BIN / "edgegen"), "serve", "--port", str(ours_port)]
    theirs = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_file)]
    theirs += ["--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--n_ctx", str(N_CTX)]
    theirs += ["--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(theirs_port)]
    theirs += ["--model_alias", MODEL, "--verbose", "False"]
    return [
        Server("edgegen", ours, ours_env, "/v2/health/ready", ours_port, model=MODEL),
        Server("llama-cpp-server", theirs, clean_env(), "/v1/models", theirs_port, model=MODEL),
    ]


def prepare_home(home: Path, source: Path | None) -> Path:
    """Copy the model from `source` (an EDGEGEN_HOME that has it) into `home`, or pull it; return the GGUF."""
    target = home / "models" / MODEL
    if not target.exists():
        if source is not None and (source / "models" / MODEL).exists():
            shutil.copytree(source / "models" / MODEL, target)
        else:
            console.print(f"[bold]edgegen models pull {MODEL}[/] into {home}")
            env = clean_env(EDGEGEN_HOME=str(home))
            subprocess.run([str(BIN / "edgegen"), "models", "pull", MODEL], env=env, check=True)
    active = (target / "ACTIVE").read_text().strip() if (target / "ACTIVE").exists() else "1"
    return target / active / "model.gguf"


# --- measurements -------------------------------------------------------------------------------------------


def record(system: str, streams: int, round_no: int, result: Wave | InProcessRun) -> dict[str, Any]:
    """One wave of one system as a flat dict (what the JSON keeps and the summary reads)."""
    row: dict[str, Any] = {"system": system, "streams": streams, "round": round_no}
    if isinstance(result, Wave):
        row.update(
            ttft_s=[s.ttft_s for s in result.streams],
            decode_tps=[s.decode_tps for s in result.streams],
            gaps_s=[g for s in result.streams for g in s.gaps_s],
            tokens=[s.tokens for s in result.streams],
            cached_tokens=[s.cached_tokens for s in result.streams],
            token_source=sorted({s.token_source for s in result.streams}),
            finish=[s.finish_reason for s in result.streams],
            wall_s=result.wall_s,
            aggregate_tps=result.aggregate_tps,
        )
    else:
        row.update(
            ttft_s=result.ttft_s,
            decode_tps=result.decode_tps,
            gaps_s=[],
            tokens=[result.tokens // len(result.ttft_s)] * len(result.ttft_s),
            cached_tokens=[0] * len(result.ttft_s),
            token_source=["exact"],
            finish=["length"] * len(result.ttft_s),
            eos_at=result.eos_at,
            wall_s=result.wall_s,
            aggregate_tps=result.aggregate_tps,
        )
    return row


def progress(row: dict[str, Any]) -> None:
    ttft = statistics.median(row["ttft_s"]) * 1000
    cached = [c for c in row["cached_tokens"] if c is not None]
    console.print(
        f"round {row['round']} n={row['streams']} {row['system']:<17} aggregate {row['aggregate_tps']:7.1f} "
        f"tok/s  decode/stream {statistics.median(row['decode_tps']):6.1f} tok/s  TTFT p50 {ttft:8.1f} ms"
        f"  max {max(row['ttft_s']) * 1000:8.1f} ms  tokens {min(row['tokens'])}–{max(row['tokens'])}"
        + (f"  cached ≤ {max(cached)}" if cached else "")
    )


class Bench:
    """Everything one run measures, in the order it measures it."""

    def __init__(self, args: argparse.Namespace, servers: list[Server], model_file: Path) -> None:
        self.args = args
        self.servers = servers
        self.model_file = model_file
        self.levels = [int(n) for n in args.streams.split(",")]
        self.refs = Refs()
        self.ceiling = Ceiling(
            model_file, LlmSettings(max_num_seqs=8, ctx_per_seq=N_CTX, n_batch=N_BATCH, threads=THREADS)
        )
        self.floor = Floor(model_file, THREADS, N_CTX)
        self.clients: dict[str, httpx.AsyncClient] = {}
        self.rows: list[dict[str, Any]] = []

    def prompt_tokens(self, system: str, user: str) -> list[int]:
        ex = self.ceiling.executor
        chat = ex.render_chat([{"role": "system", "content": system}, {"role": "user", "content": user}])
        return ex.tokenize(chat, special=True)

    def url(self, server: Server) -> str:
        return f"{server.base_url}/v1/chat/completions"

    async def check_prompts(self) -> dict[str, Any]:
        """Prompt token counts as each system sees them (they must agree), and a warm-up of each."""
        tickets = [f"{n:05d}" for n in range(0, 100_000, 997)]
        lengths = {len(self.prompt_tokens(SYSTEM.format(ref=ticket), USER)) for ticket in tickets}
        if len(lengths) != 1:
            raise RuntimeError(f"prompts differ in length with their ticket number: {sorted(lengths)}")
        counts: dict[str, Any] = {"chat": lengths.pop()}
        counts["prefix_chat"] = len(self.prompt_tokens(LONG_SYSTEM.format(ref="00000"), PREFIX_USERS[0]))
        for server in self.servers:
            body = {**chat_body(server.model, SYSTEM.format(ref=self.refs.take()), USER, 8), "stream": False}
            body.pop("stream_options")
            answer = await self.clients[server.name].post(self.url(server), json=body)
            answer.raise_for_status()
            counts[server.name] = answer.json()["usage"]["prompt_tokens"]
            await stream_chat(
                self.clients[server.name], self.url(server), chat_body(server.model, "Hi", "Hi", 8)
            )
        self.floor.run(self.prompts(1)[0], 8)
        self.ceiling.run(self.prompts(1), 8)
        return counts

    async def server_wave(self, server: Server, streams: int) -> Wave:
        bodies = [
            chat_body(server.model, SYSTEM.format(ref=self.refs.take()), USER, self.args.new_tokens)
            for _ in range(streams)
        ]
        return await wave(self.clients[server.name], self.url(server), bodies)

    def prompts(self, streams: int) -> list[list[int]]:
        return [self.prompt_tokens(SYSTEM.format(ref=self.refs.take()), USER) for _ in range(streams)]

    async def rounds(self) -> None:
        new = self.args.new_tokens
        for round_no in range(1, self.args.rounds + 1):
            for streams in self.levels:
                for _ in range(self.args.waves):
                    for server in self.servers:
                        self.add(server.name, streams, round_no, await self.server_wave(server, streams))
                    self.add("ceiling", streams, round_no, self.ceiling.run(self.prompts(streams), new))
                    if streams == 1:
                        self.add("floor", 1, round_no, self.floor.run(self.prompts(1)[0], new))

    def add(self, system: str, streams: int, round_no: int, result: Wave | InProcessRun) -> None:
        row = record(system, streams, round_no, result)
        self.rows.append(row)
        progress(row)

    async def prefix_cache(self, server: Server) -> list[dict[str, Any]]:
        """Pairs: a cold request with a fresh ~400-token system prompt, then one with another user turn."""
        pairs = []
        for _ in range(self.args.prefix_pairs):
            system = LONG_SYSTEM.format(ref=self.refs.take())
            seen: list[Stream] = []
            for user in PREFIX_USERS:
                body = chat_body(server.model, system, user, 4)
                seen.append(await stream_chat(self.clients[server.name], self.url(server), body))
            cold, warm = seen
            pairs.append(
                {
                    "cold_ttft_s": cold.ttft_s,
                    "warm_ttft_s": warm.ttft_s,
                    "ratio": warm.ttft_s / cold.ttft_s,
                    "warm_cached_tokens": warm.cached_tokens,
                }
            )
        return pairs


# --- main ---------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import fastapi
    import uvicorn

    return {
        **machine_facts(),
        "llama_cpp_python": llama_cpp.__version__,
        "httpx": httpx.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every system and level")
    parser.add_argument("--waves", type=int, default=2, help="waves per system and level in each round")
    parser.add_argument("--streams", default="1,4,8", help="comma-separated concurrent stream counts")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens to generate per request")
    parser.add_argument("--prefix-pairs", type=int, default=5, help="cold/warm pairs for the prefix cache")
    parser.add_argument(
        "--source-home", type=Path, default=None, help="an EDGEGEN_HOME that has the model (default: pull it)"
    )
    parser.add_argument("--home", type=Path, help="EDGEGEN_HOME to use (default: a fresh temp dir)")
    return parser.parse_args()


def cpu_shares(before: Any, after: Any) -> dict[str, float]:
    """Shares of all CPU time between two `psutil.cpu_times()`: busy, idle and stolen by the hypervisor."""
    spent = {k: getattr(after, k) - getattr(before, k) for k in after._fields}
    total = sum(spent.values()) or 1.0
    return {"idle": spent["idle"] / total, "steal": spent.get("steal", 0.0) / total}


async def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    cpu_before = psutil.cpu_times()
    model_file = prepare_home(home, args.source_home)
    tensor_bytes = gguf_tensor_bytes(model_file)
    bandwidth = copy_bandwidth()
    console.print(
        f"[bold]model[/] {model_file} ({model_file.stat().st_size / 1e6:.1f} MB file, "
        f"{tensor_bytes / 1e6:.1f} MB tensors)  [bold]copy bandwidth[/] {bandwidth['gb_per_s']:.1f} GB/s"
    )
    servers = define_servers(home, model_file)
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    bench: Bench | None = None
    try:
        memory_idle: dict[str, dict[str, int]] = {}
        for server in servers:  # one at a time, so that the start-up times are not contended
            start(server, logs)
            memory_idle[server.name] = memory_of(server)
            console.print(f"started {server.name} on :{server.port} in {server.startup_s:.2f} s")
        bench = Bench(args, servers, model_file)
        bench.clients = {s.name: new_client(max(bench.levels)) for s in servers}
        prompt_counts = await bench.check_prompts()
        console.print("[bold]prompt tokens[/]", prompt_counts)
        await bench.rounds()
        prefix = {server.name: await bench.prefix_cache(server) for server in servers}
        for server in servers:
            server.memory = memory_of(server)
    finally:
        if bench is not None:
            for client in bench.clients.values():
                await client.aclose()
        for server in servers:
            stop(server)
    observer_errors = _count_lines(servers[0].log, "generation observer failed")
    assert bench is not None
    bench.ceiling.close()
    bench.floor.close()
    return {
        "model_file": str(model_file),
        "model_file_bytes": model_file.stat().st_size,
        "tensor_bytes": tensor_bytes,
        "bandwidth": bandwidth,
        "prompt_tokens": prompt_counts,
        "servers": {
            s.name: {
                "command": s.command,
                "startup_s": s.startup_s,
                "memory_idle": memory_idle[s.name],
                "memory_after": s.memory,
            }
            for s in servers
        },
        "edgegen_log_observer_errors": observer_errors,
        "cpu_during_run": cpu_shares(cpu_before, psutil.cpu_times()),
        "runs": bench.rows,
        "prefix_cache": prefix,
    }


def _count_lines(path: Path | None, needle: str) -> int:
    if path is None or not path.exists():
        return 0
    with path.open(errors="replace") as lines:
        return sum(needle in line for line in lines)


def main() -> None:
    args = parse_args()
    info = machine()
    console.print("[bold]machine[/]", info)
    started = time.perf_counter()
    with home_dir(args.home, prefix="edgegen-llm-bench-") as home:
        result = asyncio.run(run(args, home))
    summary: Summary = summarize(result["runs"])
    checks = targets(summary, result["prefix_cache"].get("edgegen", []))
    print_report(console, summary, checks, result)
    table = markdown(summary, checks, result)
    console.print("\n[bold]Markdown[/]\n")
    print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"llm-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    record_ = {
        "command": " ".join([".venv/bin/python", "bench/llm.py", *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": info,
        "duration_s": time.perf_counter() - started,
        **result,
        "summary": [{"system": k[0], "streams": k[1], **v} for k, v in summary.items()],
        "targets": checks,
        "markdown": table,
    }
    out.write_text(json.dumps(record_, indent=2))
    console.print(f"\nresults: {out}  ({record_['duration_s']:.0f} s)")


if __name__ == "__main__":
    main()
