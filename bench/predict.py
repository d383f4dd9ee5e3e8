"""Benchmark `POST /predict` on loopback: our node against the seed's Flask app and a bare HTTP floor.

What it measures. Correct-answer throughput and latency of the seed protocol (`{"input_data": [64 grey
levels]}` → `{"prediction": [[10 logits]]}`) with the digits student MLP — or, with `--model teacher`, the
seed's own teacher MLP (784-1200-1200-10, 2.4 M parameters, seeded random weights: its cost, not its
accuracy, is measured; bodies of 784 values in [0, 1]) — for these servers, each started fresh once per
run on 127.0.0.1:

    seed-flask      bench/baselines/seed_app.py, the seed's app as it wrote it, Flask's threaded dev server
    seed-gunicorn   the same app under `gunicorn -w 2` (sync workers), the seed's production advice
    edgegen         `edgegen serve` (FastAPI on uvicorn, uvloop + httptools), 1 worker
    edgegen-w2      `edgegen serve --workers 2`
    floor           bench/baselines/floor_app.py: raw ASGI on the same uvicorn stack, parses the body with
                    orjson and answers a constant; no model. 1 worker. Its answers count when well formed
                    (10 numbers), since they cannot carry the right logits
    floor-w2        the same with 2 workers: the floor of edgegen-w2
    edgegen-base    with `--baseline-src DIR`: `edgegen serve` from another tree's `src/`, 1 worker (A B
                    against a commit, in the same rounds)

How. The load generator is wrk (Debian's; installed with apt-get when missing) driven by
bench/predict.lua: each wrk thread holds one connection (`-t C -c C`) and cycles through K distinct bodies
made from real test-split digit images; the answer must carry the 10 logits ONNX Runtime computes
in-process for that very image (within 1e-3 abs + rel), or it counts as wrong. Concurrency 1, 8 and 64;
each measurement is a short wrk run after a short warm-up, in rounds (every round visits every server at
every concurrency) so machine noise hits all servers alike. The report gives, per server and concurrency,
the median and min–max over rounds of correct answers per second, the median p50 and p99 latency, wrong
answers and errors; the ratios against seed-gunicorn and the matching floor; whether the targets of the
issue are met; the resident memory of our node after the load and its time from start to ready; and the
in-process floor (`InferenceSession.run`, batch 1 and 32, one intra-op thread).

    python bench/predict.py [--model digits|teacher] [--rounds 3] [--duration 5] [--warmup 1]
                            [--concurrency 1,8,64] [--home DIR] [--servers a,b] [--baseline-src DIR]

Results go to bench/results/<timestamp>.json; a Markdown table ready to paste is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
from rich.console import Console
from rich.table import Table

from servers import (
    LIKE_BASELINES,
    Server,
    clean_env,
    cpu_seconds,
    free_port,
    home_dir,
    machine_facts,
    memory_of,
    start,
    stop,
)

BENCH = Path(__file__).resolve().parent
BASELINES = BENCH / "baselines"
LUA = BENCH / "predict.lua"
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
console = Console(width=None if sys.stdout.isatty() else 130)
Summary = dict[tuple[str, int], dict[str, Any]]  # (server, concurrency) -> figures over the rounds


# --- servers -------------------------------------------------------------------------------------


def define_servers(
    home: Path, first_body: bytes, model: str = "digits", baseline_src: str | None = None
) -> list[Server]:
    """The seed's app (alone and under gunicorn), our node (one process and two), the uvicorn floor (one
    and two), and with `baseline_src` our node run from another tree's `src/` (A B against a commit)."""
    tflite = model_file(home, f"{model}-tflite", "model.tflite")
    uvicorn_floor = [str(BIN / "uvicorn"), "floor_app:app", "--app-dir", str(BASELINES)]
    uvicorn_floor += ["--host", "127.0.0.1", "--loop", "uvloop", "--http", "httptools"]
    uvicorn_floor += ["--no-access-log", "--log-level", "warning"]
    servers: list[Server] = []
    names = ["seed-flask", "seed-gunicorn", "edgegen", "edgegen-w2", "floor", "floor-w2"]
    if baseline_src is not None:
        names.insert(3, "edgegen-base")
    for name in names:
        port = free_port()
        workers = "2" if name.endswith("w2") else "1"
        if name == "seed-flask":
            command = [sys.executable, str(BASELINES / "seed_app.py")]
        elif name == "seed-gunicorn":
            command = [str(BIN / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}", "seed_app:app"]
        elif name.startswith("edgegen"):
            command = [str(BIN / "edgegen"), "serve", "--port", str(port), "--workers", workers]
        else:
            command = [*uvicorn_floor, "--port", str(port), "--workers", workers]
        if name.startswith("edgegen"):
            # A home of its own per node (two nodes never share one), with the store built once.
            node_home = home / "nodes" / name
            node_home.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                (node_home / "models").symlink_to(home / "models")
            env = clean_env(EDGEGEN_HOME=str(node_home), EDGEGEN_DEFAULT_MODEL=model, **LIKE_BASELINES)
            if name == "edgegen-base":
                env["PYTHONPATH"] = str(baseline_src)
            ready_path, ready_post = "/v2/health/ready", None
        else:
            env = clean_env(SEED_MODEL_PATH=str(tflite), SEED_PORT=str(port))
            ready_path, ready_post = "/predict", first_body
        check = "shape" if name.startswith("floor") else "values"
        servers.append(
            Server(name, command, env, ready_path, port, cwd=BASELINES, ready_post=ready_post, check=check)
        )
    return servers


def model_file(home: Path, name: str, file: str) -> Path:
    active = home / "models" / name / "ACTIVE"
    version = active.read_text().strip() if active.exists() else "1"
    return home / "models" / name / version / file


def ensure_models(home: Path) -> None:
    wanted = (model_file(home, "digits", "model.onnx"), model_file(home, "digits-tflite", "model.tflite"))
    if all(path.exists() for path in wanted):
        return
    console.print(f"[bold]edgegen models pull digits[/] into {home}")
    subprocess.run(
        [str(BIN / "edgegen"), "models", "pull", "digits"], env=clean_env(EDGEGEN_HOME=str(home)), check=True
    )


TEACHER = (784, 1200, 1200, 10)  # the seed's teacher MLP


def ensure_teacher(home: Path) -> None:
    """The seed's teacher MLP in the store, as `teacher` (ONNX, for the nodes) and `teacher-tflite` (for
    the seed's app): He-scaled random weights from a fixed seed, the same in both files."""
    if model_file(home, "teacher", "model.onnx").exists():
        return
    from edgegen.executors import describe_model
    from edgegen.modelkit.layers import DenseLayer
    from edgegen.modelkit.onnx_writer import mlp_to_onnx
    from edgegen.modelkit.tflite_writer import mlp_to_tflite
    from edgegen.security.signing import Signer
    from edgegen.store import ModelStore

    rng = np.random.default_rng(784)
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(TEACHER)):
        weight = rng.normal(0, np.sqrt(2 / n_in), (n_out, n_in)).astype(np.float32)
        bias = rng.normal(0, 0.01, n_out).astype(np.float32)
        layers.append(DenseLayer(weight, bias, "relu" if i < len(TEACHER) - 2 else "none"))
    # Signed with the home's key, as `edgegen models pull` signs digits there.
    store = ModelStore(home / "models", signer=Signer.local(home), describe=describe_model)
    built = home / "teacher-build"
    built.mkdir(parents=True, exist_ok=True)
    (built / "model.onnx").write_bytes(mlp_to_onnx(layers, doc="the seed's teacher MLP, random weights"))
    (built / "model.tflite").write_bytes(mlp_to_tflite(layers, description="the seed's teacher MLP"))
    store.add(built / "model.onnx", "teacher")
    store.add(built / "model.tflite", "teacher-tflite")


def teacher_inputs(count: int) -> np.ndarray:
    """`count` distinct 784-value images in [0, 1], as MNIST's normalised pixels are."""
    return np.random.default_rng(28).uniform(0, 1, (count, TEACHER[0])).astype(np.float32)


def session(model: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def write_data(model: Path, count: int, path: Path, teacher: bool = False) -> bytes:
    """Write `body<TAB>10 expected logits` a line for `count` test images (the teacher's: random ones);
    return the first body."""
    from edgegen.modelkit.digits import sample_inputs

    images = teacher_inputs(count) if teacher else sample_inputs(count)
    if len(images) < count:  # the test split is ~360 images; cycle it if more are asked
        images = np.resize(images, (count, images.shape[1]))
    logits = session(model).run(["logits"], {"input": images.astype(np.float32)})[0]
    bodies = [orjson.dumps({"input_data": image.tolist()}) for image in images]
    with path.open("w") as out:
        for body, row in zip(bodies, logits, strict=True):
            out.write(body.decode() + "\t" + " ".join(f"{x:.9g}" for x in row) + "\n")
    return bodies[0]


def in_process_floor(model: Path, runs: int = 3000, teacher: bool = False) -> dict[str, float]:
    """Median µs per sample of `InferenceSession.run`, batch 1 and batch 32, one intra-op thread."""
    from edgegen.modelkit.digits import sample_inputs

    sess = session(model)
    floor: dict[str, float] = {}
    for batch in (1, 32):
        images = teacher_inputs(batch) if teacher else sample_inputs(batch)
        feed = {"input": np.ascontiguousarray(images)}
        for _ in range(100):
            sess.run(None, feed)
        times = []
        for _ in range(runs if batch == 1 else runs // 4):
            t0 = time.perf_counter_ns()
            sess.run(None, feed)
            times.append(time.perf_counter_ns() - t0)
        floor[f"batch{batch}_us_per_sample"] = statistics.median(times) / 1000 / batch
    return floor


# --- load ------------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        console.print("[bold]wrk[/] is missing: apt-get install -y wrk")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
        wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed and apt-get could not install it")
    return wrk


def digits_workload(root: Path) -> tuple[Path, Path, str]:
    """For the benchmarks that drive nodes with wrk: a home under `root` with digits in its store, 64
    request bodies with their expected logits, and the wrk binary."""
    home = root / "home"
    ensure_models(home)
    data = root / "data.txt"
    write_data(model_file(home, "digits", "model.onnx"), 64, data)
    return home, data, ensure_wrk()


def run_wrk(
    wrk: str, server: Server, concurrency: int, seconds: int, data: Path, key: str = ""
) -> dict[str, Any]:
    command = [wrk, "-t", str(concurrency), "-c", str(concurrency), "-d", f"{seconds}s", "--timeout", "5s"]
    command += ["-s", str(LUA), f"http://127.0.0.1:{server.port}", "--", str(data), "/predict", server.check]
    command += [key]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            result["correct_rps"] = result["correct"] / (result["duration_us"] / 1e6)
            return result
    raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")


def alternate(
    wrk: str, servers: dict[str, Server], data: Path, rounds: int, seconds: int, label: str
) -> list[dict[str, Any]]:
    """Rounds of wrk at c1 and c64 against each server in turn — A B A B: the same noise falls on every
    one —, answers checked; one record per run."""
    runs: list[dict[str, Any]] = []
    for round_no in range(rounds):
        for concurrency in (1, 64):
            for name, server in servers.items():
                result = run_wrk(wrk, server, concurrency, seconds, data)
                assert (result["wrong"], result["non_200"]) == (0, 0), result
                runs.append({"server": name, "concurrency": concurrency, "round": round_no, **result})
                p50, rps = result["p50_us"], result["correct_rps"]
                console.print(f"{label} {name} c{concurrency} round {round_no}: p50 {p50} µs, {rps:.0f}/s")
    return runs


# --- report ----------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> Summary:
    """Per server × concurrency: median and min–max over rounds; wrong and errors summed."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["server"], run["concurrency"]), []).append(run)
    summary = {}
    for key, group in groups.items():
        rps = [r["correct_rps"] for r in group]
        summary[key] = {
            "rounds": len(group),
            "correct_rps": statistics.median(rps),
            "correct_rps_min": min(rps),
            "correct_rps_max": max(rps),
            "p50_ms": statistics.median(r["p50_us"] for r in group) / 1000,
            "p99_ms": statistics.median(r["p99_us"] for r in group) / 1000,
            "cpu_us_per_answer": statistics.median(r["cpu_us_per_answer"] for r in group),
            "requests": sum(r["requests"] for r in group),
            "wrong": sum(r["wrong"] for r in group),
            "errors": sum(r["non_200"] + r["socket_errors"] for r in group),
        }
    return summary


def ratios(summary: Summary, levels: list[int]) -> list[dict[str, Any]]:
    rows = []
    for node, floor in (("edgegen", "floor"), ("edgegen-w2", "floor-w2")):
        for c in levels:
            ours, seed, bare = (summary.get((s, c)) for s in (node, "seed-gunicorn", floor))
            if ours is None:
                continue
            row: dict[str, Any] = {"server": node, "concurrency": c}
            if seed:
                row["rps_vs_gunicorn"] = ours["correct_rps"] / max(seed["correct_rps"], 1e-9)
                row["p50_vs_gunicorn"] = ours["p50_ms"] / seed["p50_ms"]
                row["p99_vs_gunicorn"] = ours["p99_ms"] / seed["p99_ms"]
            if bare and bare["correct_rps"] > 0:
                row["rps_vs_floor"] = ours["correct_rps"] / bare["correct_rps"]
            rows.append(row)
    return rows


def targets(summary: Summary) -> list[dict[str, Any]]:
    """The issue's targets, for each edgegen variant against seed-gunicorn and its matching floor."""
    checks = []
    for node, floor in (("edgegen", "floor"), ("edgegen-w2", "floor-w2")):
        ours64, seed64, bare64 = (summary.get((s, 64)) for s in (node, "seed-gunicorn", floor))
        ours1, seed1 = summary.get((node, 1)), summary.get(("seed-gunicorn", 1))
        found: list[tuple[str, float | None, float, Callable[[float, float], bool]]] = []
        if ours64 and seed64:
            ratio = ours64["correct_rps"] / max(seed64["correct_rps"], 1e-9)
            found.append(("c64 throughput ≥ 3× seed-gunicorn", ratio, 3.0, lambda v, t: v >= t))
            found.append(("c64 p99 ≤ ¼ seed-gunicorn", ours64["p99_ms"] / seed64["p99_ms"], 0.25, _le))
        if ours64 and bare64:
            ratio = ours64["correct_rps"] / bare64["correct_rps"]
            found.append((f"c64 throughput ≥ 50% of {floor}", ratio, 0.5, lambda v, t: v >= t))
        if ours1 and seed1:
            found.append(("c1 p50 ≤ seed-gunicorn", ours1["p50_ms"] / seed1["p50_ms"], 1.0, _le))
        for name, value, threshold, ok in found:
            met = value is not None and ok(value, threshold)
            checks.append({"server": node, "target": name, "value": value, "threshold": threshold})
            checks[-1]["met"] = met
    return checks


def _le(value: float, threshold: float) -> bool:
    return value <= threshold


def results_table(summary: Summary, names: list[str], levels: list[int]) -> Table:
    table = Table(title="POST /predict, correct answers only (median over rounds)")
    columns = (
        "server",
        "conc",
        "correct req/s",
        "min–max",
        "p50 ms",
        "p99 ms",
        "CPU µs/req",
        "wrong",
        "errors",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "server" else "right")
    for c in levels:
        for name in names:
            s = summary.get((name, c))
            if s:
                table.add_row(
                    name, str(c), f"{s['correct_rps']:,.0f}",
                    f"{s['correct_rps_min']:,.0f}–{s['correct_rps_max']:,.0f}",
                    f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['cpu_us_per_answer']:.0f}",
                    str(s["wrong"]), str(s["errors"]),
                )  # fmt: skip
        table.add_section()
    return table


def markdown(
    summary: Summary,
    names: list[str],
    levels: list[int],
    ratio_rows: list[dict[str, Any]],
    checks: list[dict[str, Any]],
) -> str:
    lines = [
        "| server | conc | correct req/s | min–max | p50 ms | p99 ms | CPU µs/req | wrong | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in levels:
        for name in names:
            s = summary.get((name, c))
            if s:
                lines.append(
                    f"| {name} | {c} | {s['correct_rps']:,.0f} | {s['correct_rps_min']:,.0f}–"
                    f"{s['correct_rps_max']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                    f"{s['cpu_us_per_answer']:.0f} | {s['wrong']:,} "
                    f"| {s['errors']:,} |"
                )
    lines += [
        "",
        "| server | conc | req/s ÷ seed-gunicorn | req/s ÷ floor | p50 ÷ gunicorn | p99 ÷ gunicorn |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for row in ratio_rows:
        cells = [_fmt(row.get(k)) for k in ("rps_vs_gunicorn", "rps_vs_floor", "p50_vs_gunicorn")]
        cells.append(_fmt(row.get("p99_vs_gunicorn")))
        lines.append(f"| {row['server']} | {row['concurrency']} | " + " | ".join(cells) + " |")
    lines += ["", "| server | target | value | met |", "|---|---|--:|---|"]
    for check in checks:
        met = "yes" if check["met"] else "**no**"
        lines.append(f"| {check['server']} | {check['target']} | {_fmt(check['value'])} | {met} |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def machine() -> dict[str, Any]:
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.splitlines()
    return {
        **machine_facts(),
        "onnxruntime": ort.__version__,
        "wrk": wrk[0].strip() if wrk else "unknown",
    }


def progress(r: dict[str, Any]) -> None:
    console.print(
        f"round {r['round']} c={r['concurrency']:<3} {r['server']:<14} {r['correct_rps']:9,.0f} req/s  "
        f"p50 {r['p50_us'] / 1000:7.2f} ms  p99 {r['p99_us'] / 1000:7.2f} ms  wrong {r['wrong']}  "
        f"non-200 {r['non_200']}  socket errors {r['socket_errors']}"
    )


# --- main ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("digits", "teacher"), default="digits", help="the MLP served")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every server × concurrency")
    parser.add_argument("--duration", type=int, default=5, help="seconds of each measured wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk before each measured run")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated connection counts")
    parser.add_argument("--samples", type=int, default=256, help="distinct request bodies per wrk thread")
    parser.add_argument("--servers", default="", help="comma-separated subset of the servers (default all)")
    parser.add_argument("--home", type=Path, help="EDGEGEN_HOME to use (default: a fresh temp dir)")
    parser.add_argument("--baseline-src", help="another tree's src/: its node runs too, as `edgegen-base`")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    wrk = ensure_wrk()
    info = machine()
    console.print("[bold]machine[/]", info)
    runs: list[dict[str, Any]] = []
    with home_dir(args.home) as home:
        ensure_models(home)
        teacher = args.model == "teacher"
        if teacher:
            ensure_teacher(home)
        onnx_model = model_file(home, args.model, "model.onnx")
        data = home / f"predict-bodies-{args.model}.tsv"
        first_body = write_data(onnx_model, args.samples, data, teacher)
        floor_in_process = in_process_floor(onnx_model, 300 if teacher else 3000, teacher)
        console.print("[bold]in-process floor[/] (onnxruntime, 1 intra-op thread):", floor_in_process)
        servers = define_servers(home, first_body, args.model, args.baseline_src)
        if args.servers:
            wanted = set(args.servers.split(","))
            servers = [s for s in servers if s.name in wanted]
        logs = home / "logs"
        logs.mkdir(exist_ok=True)
        try:
            for server in servers:  # one at a time, so that the start-up times are not contended
                start(server, logs)
                console.print(f"started {server.name} on :{server.port} in {server.startup_s:.2f} s")
            for round_no in range(1, args.rounds + 1):
                for c in levels:
                    for server in servers:
                        run_wrk(wrk, server, c, args.warmup, data)
                        cpu_before = cpu_seconds(server)
                        result = run_wrk(wrk, server, c, args.duration, data)
                        cpu = cpu_seconds(server) - cpu_before
                        result.update(server=server.name, concurrency=c, round=round_no, server_cpu_s=cpu)
                        result["cpu_us_per_answer"] = cpu * 1e6 / max(result["requests"], 1)
                        runs.append(result)
                        progress(result)
            for server in servers:
                server.memory = memory_of(server)
        finally:
            for server in servers:
                stop(server)

    names = [s.name for s in servers]
    summary = summarize(runs)
    ratio_rows = ratios(summary, levels)
    checks = targets(summary)
    console.print(results_table(summary, names, levels))
    for server in servers:
        m = server.memory
        console.print(
            f"{server.name:<14} ready in {server.startup_s:5.2f} s   after the load: RSS "
            f"{m.get('rss', 0) / 2**20:6.1f} MiB, PSS {m.get('pss', 0) / 2**20:6.1f} MiB "
            f"over {m.get('processes', 0)} processes"
        )
    for check in checks:
        mark = "[green]met[/]" if check["met"] else "[red]MISSED[/]"
        console.print(f"{check['server']:<11} {check['target']:<36} {_fmt(check['value']):>6}  {mark}")
    table = markdown(summary, names, levels, ratio_rows, checks)
    console.print("\n[bold]Markdown[/]\n")
    print(table)

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": info,
        "in_process_floor": floor_in_process,
        "servers": {
            s.name: {"command": s.command, "startup_s": s.startup_s, "memory": s.memory} for s in servers
        },
        "runs": runs,
        "summary": [{"server": k[0], "concurrency": k[1], **v} for k, v in summary.items()],
        "ratios": ratio_rows,
        "targets": checks,
        "markdown": table,
    }
    out.write_text(json.dumps(record, indent=2))
    console.print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
