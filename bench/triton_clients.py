"""Triton's own load generator, perf_analyzer, against a node and against MLServer on the same ONNX file.

What it measures. Inferences/s and client-side p50/p99 latency of KServe v2 inference of the `digits`
student MLP (64 inputs → 10 logits, batch 1 per request), at 1, 8 and 64 concurrent clients, for:

    edgegen http        perf_analyzer's standard Triton mode (`-i http`; binary tensors), the node auth off
    edgegen grpc        the same over gRPC (`-i grpc`, the node's `grpc_port`)
    edgegen http auth   the standard mode over HTTP with `-H "Authorization: Bearer KEY"` against a second
                        node with authentication on (rate limits set above what the client can send)
    edgegen http json   perf_analyzer's generic mode (`--service-kind openai --endpoint
                        v2/models/digits/infer`): it POSTs a KServe v2 JSON body as it is and times the answer
    mlserver http json  the same generic mode against MLServer (PyPI `mlserver`) serving the same .onnx file
                        through bench/baselines/mlserver_onnx.py, one intra-op thread

MLServer cannot be driven in the standard mode: it has no model configuration extension (HTTP answers
404, gRPC "Method not found"), which perf_analyzer reads before it sends anything. The bench asks it once
and records the error; the node ÷ MLServer ratios compare the generic-mode rows, the same client sending
the same bytes to both. The generic mode runs asynchronously (perf_analyzer requires it there); the
standard mode runs perf_analyzer's default, one synchronous client thread per concurrent request.

Every row draws from the same 64 distinct test-split digit images (perf_analyzer's `--input-data`, in turn).
Before measuring, each row's server answers all 64 once through `tritonclient` (binary tensors to the
node over HTTP and gRPC, JSON to MLServer), and every answer must match ONNX Runtime's logits computed
in-process (1e-3 abs + rel). Both servers run without response cache and without access logs, the
node with `LIKE_BASELINES` of bench/servers.py; MLServer with its defaults otherwise (one inference worker
process beside its HTTP/gRPC process, no adaptive batching). Each measurement is a short warm-up run,
then three windows of `--window-ms` (perf_analyzer's stability check switched off: a shared machine
rarely gives three windows within 10 %); rounds visit every row at every level in turn (A B A B), so
noise falls on all rows alike. The report gives medians over rounds with min–max, the node's server-
side queue and compute times perf_analyzer reads from its statistics extension, and the issue's targets.

Tools live in .bench/ (not committed), made on first use:

    .bench/perf-analyzer  tritonclient 2.51.0's manylinux wheel, the last whose perf_analyzer binary needs no
                          more than GLIBC_2.34 / GLIBCXX_3.4.30 (2.52 and later need GLIBC_2.38; PyPI's
                          `perf-analyzer` 0.1.0 is a placeholder without a binary), with the two libraries
                          it links that Debian 12 lacks: libcudart.so.12 (PyPI `nvidia-cuda-runtime-cu12`;
                          loaded, never used on a CPU) and libb64.so.0d (Debian's `libb64-0d`, `apt-get
                          download` + `dpkg -x`, no root needed)
    .bench/mlserver       MLServer 1.7.1 with our onnxruntime version and uvloop < 0.22 (with 0.22 and later
                          its inference worker dies at start: `asyncio.get_event_loop()` raises there)

    .venv/bin/python bench/triton_clients.py [--rounds 3] [--window-ms 2000] [--concurrency 1,8,64]

Results go to bench/results/triton-clients-<timestamp>.json; a Markdown table ready to paste is printed at
the end.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from rich.console import Console
from tritonclient.utils import InferenceServerException

from edgegen.modelkit.digits import sample_inputs
from edgegen.security.keys import KeyStore
from predict import BIN, ensure_models, model_file, session
from security import UNLIMITED
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

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "bench" / "baselines"
TOOLS = ROOT / ".bench"
MODEL = "digits"
INPUTS = 64  # distinct images, sent in turn by every client
PERF_ANALYZER = ("tritonclient==2.51.0", "nvidia-cuda-runtime-cu12==12.6.77")
MLSERVER = ("mlserver==1.7.1", "uvloop<0.22", f"onnxruntime=={ort.__version__}")
console = Console(width=None if sys.stdout.isatty() else 130)
Summary = dict[tuple[str, int], dict[str, Any]]  # (row, concurrency) -> figures over the rounds


# --- tools ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerfAnalyzer:
    """The binary, and the library path that lets it load on this machine."""

    binary: Path
    library_path: str

    def run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        env = clean_env(LD_LIBRARY_PATH=self.library_path)
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=env, check=False)

    def version(self) -> str:
        done = self.run(["--version"])
        return (done.stdout + done.stderr).strip()  # it writes its version to stderr


def venv(path: Path, packages: tuple[str, ...], *pip_args: str) -> None:
    """A virtual environment of its own per tool: neither may change what our .venv resolves to."""
    console.print(f"[bold]{path}[/]: python -m venv; pip install {' '.join(packages)}")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "-q", *pip_args, *packages], check=True)


def ensure_perf_analyzer() -> PerfAnalyzer:
    """perf_analyzer 2.51.0 in .bench/perf-analyzer, with the libraries it needs (see the module's text)."""
    root = TOOLS / "perf-analyzer"
    binary = root / "bin" / "perf_analyzer"
    libb64 = root / "libb64"
    if not binary.exists():
        venv(root, PERF_ANALYZER, "--no-deps")  # the binary alone: the wheel's Python client is not used
    if not libb64.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "-q", "libb64-0d"], cwd=tmp, check=True)
            deb = next(Path(tmp).glob("libb64-0d_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(libb64)], check=True)
    libraries = [*libb64.glob("usr/lib/*/libb64.so.0d"), *root.glob("lib/python*/site-packages/nvidia/*/lib")]
    directories = sorted({str(p.parent if p.is_file() else p) for p in libraries})
    tool = PerfAnalyzer(binary, ":".join(directories))
    if not tool.version().startswith("Perf Analyzer"):
        raise RuntimeError(f"{binary} does not start here: {tool.version()}")
    return tool


def ensure_mlserver() -> Path:
    """MLServer in .bench/mlserver; the runtime it loads comes from bench/baselines on PYTHONPATH."""
    root = TOOLS / "mlserver"
    mlserver = root / "bin" / "mlserver"
    if not mlserver.exists():
        venv(root, MLSERVER)
    return mlserver


# --- inputs -----------------------------------------------------------------------------------------------


def write_inputs(images: np.ndarray, home: Path) -> tuple[Path, Path]:
    """perf_analyzer's `--input-data` files, one entry per image: tensors for the standard mode, whole
    KServe v2 JSON bodies for the generic mode."""
    tensors = {"data": [{"input": {"content": image.tolist(), "shape": [64]}} for image in images]}
    bodies = {
        "data": [
            {"payload": [{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row}]}]}
            for row in images.tolist()
        ]
    }
    paths = home / "tensors.json", home / "bodies.json"
    for path, data in zip(paths, (tensors, bodies), strict=True):
        path.write_text(json.dumps(data))
    return paths


# --- servers and rows -------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a server, a protocol, and how perf_analyzer talks to it."""

    name: str
    server: Server
    protocol: str  # "http" | "grpc"
    mode: str  # "standard" (Triton) | "generic" (a JSON body POSTed as it is)
    port: int
    key: str = ""
    checked: dict[str, Any] = field(default_factory=dict)

    def perf_args(self, data: dict[str, Path]) -> list[str]:
        args = ["-m", MODEL, "-u", f"127.0.0.1:{self.port}"]
        if self.mode == "standard":
            args += ["-i", self.protocol, "--input-data", str(data["standard"])]
        else:
            args += ["--service-kind", "openai", "--endpoint", f"v2/models/{MODEL}/infer", "--async"]
            args += ["--input-data", str(data["generic"])]
        if self.key:
            args += ["-H", f"Authorization: Bearer {self.key}"]
        return args

    def record(self, data: dict[str, Path]) -> dict[str, Any]:
        """What the results file keeps of the row (the API key left out)."""
        args = [arg.replace(self.key, "KEY") if self.key else arg for arg in self.perf_args(data)]
        facts = {"server": self.server.name, "protocol": self.protocol, "mode": self.mode}
        return {**facts, "checked": self.checked, "perf_analyzer_args": args}


def node(home: Path, name: str, auth: bool) -> tuple[Server, int]:
    """A node with a home of its own (two nodes never share one) and its models linked in; gRPC on."""
    node_home = home / "nodes" / name
    node_home.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (node_home / "models").symlink_to(home / "models")
    port, grpc_port = free_port(), free_port()
    env = clean_env(EDGEGEN_HOME=str(node_home), EDGEGEN_GRPC_PORT=str(grpc_port), EDGEGEN_ACCESS_LOG="false")
    env.update(LIKE_BASELINES)
    if auth:
        env.update(EDGEGEN_SECURITY__AUTH="true", **UNLIMITED)
    command = [str(BIN / "edgegen"), "serve", "--port", str(port)]
    return Server(name, command, env, "/v2/health/ready", port), grpc_port


def mlserver(home: Path, binary: Path, model: Path) -> tuple[Server, int]:
    """MLServer with our runtime on the same file; its settings say only ports, host and quiet logs."""
    root = home / "mlserver"
    (root / MODEL).mkdir(parents=True, exist_ok=True)
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    settings["debug"] = False  # its default (true) logs every request; our node's access log is off too
    (root / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": MODEL,
        "implementation": "mlserver_onnx.OnnxRuntimeModel",
        "parameters": {"uri": str(model)},
    }
    (root / MODEL / "model-settings.json").write_text(json.dumps(model_settings))
    env = clean_env(PYTHONPATH=str(BASELINES))
    command = [str(binary), "start", str(root)]
    # In its own folder: MLServer keeps its metrics in `.metrics` under the directory it starts in.
    return Server("mlserver", command, env, f"/v2/models/{MODEL}/ready", port, cwd=root), grpc_port


def check_answers(row: Row, images: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    """Send every image once through tritonclient (binary tensors, but JSON to MLServer, which reads no
    binary extension) and compare with the logits computed in-process; raise on any difference. A row
    with a key must also be refused without it: the proof that its node authenticates."""
    binary = row.server.name != "mlserver"
    module: Any = triton_grpc if row.protocol == "grpc" else triton_http
    client = module.InferenceServerClient(f"127.0.0.1:{row.port}")

    def infer(image: np.ndarray, headers: dict[str, str] | None) -> np.ndarray:
        tensor = module.InferInput("input", [1, 64], "FP32")
        if row.protocol == "grpc":
            tensor.set_data_from_numpy(image[None, :])
            output = module.InferRequestedOutput("logits")
        else:
            tensor.set_data_from_numpy(image[None, :], binary_data=binary)
            output = module.InferRequestedOutput("logits", binary_data=binary)
        answer: np.ndarray = client.infer(MODEL, [tensor], outputs=[output], headers=headers).as_numpy(
            "logits"
        )
        return answer[0]

    worst = 0.0
    try:
        for image, want in zip(images, expected, strict=True):
            got = infer(image, {"Authorization": f"Bearer {row.key}"} if row.key else None)
            if not np.allclose(got, want, atol=1e-3, rtol=1e-3):
                raise RuntimeError(f"{row.name}: wrong logits {got} for an image whose logits are {want}")
            worst = max(worst, float(np.max(np.abs(got - want))))
        if row.key:
            with contextlib.suppress(InferenceServerException):
                infer(images[0], None)
                raise RuntimeError(f"{row.name}: answered a request without its API key")
    finally:
        client.close()
    return {"answers": len(images), "max_abs_error": worst, "refused_without_key": bool(row.key)}


def standard_mode_error(tool: PerfAnalyzer, port: int, protocol: str, data: Path) -> str:
    """What perf_analyzer's standard mode says of MLServer (it stops before its first request)."""
    args = ["-m", MODEL, "-u", f"127.0.0.1:{port}", "-i", protocol, "--input-data", str(data), "-p", "200"]
    done = tool.run(args)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line.lower()]
    return f"exit {done.returncode}: " + (lines[0].strip() if lines else "no error line")


# --- measuring --------------------------------------------------------------------------------------------


def measure(
    tool: PerfAnalyzer, row: Row, concurrency: int, window_ms: int, data: dict[str, Path], out: Path
) -> dict[str, Any]:
    """One perf_analyzer run: three windows at a fixed concurrency; its CSV row, in numbers."""
    args = [*row.perf_args(data), "--concurrency-range", str(concurrency), "-p", str(window_ms)]
    args += ["-s", "1000", "-f", str(out)]  # stability within 1000 %: always the first three windows
    done = tool.run(args)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer on {row.name} c{concurrency}: {done.stdout[-600:]}{done.stderr}")
    with out.open() as f:
        record = next(csv.DictReader(f))
    return {key: float(value) for key, value in record.items()}


def rounds(
    tool: PerfAnalyzer, rows: list[Row], levels: list[int], args: argparse.Namespace, data: dict[str, Path]
) -> list[dict[str, Any]]:
    """Every row at every level, round after round; a warm-up run before each measured one."""
    runs: list[dict[str, Any]] = []
    out = data["standard"].parent / "perf.csv"
    for round_no in range(1, args.rounds + 1):
        for concurrency in levels:
            for row in rows:  # A B A B: each level's rows share the same minutes of the machine
                measure(tool, row, concurrency, args.warmup_ms, data, out)
                figures = measure(tool, row, concurrency, args.window_ms, data, out)
                run = {"row": row.name, "concurrency": concurrency, "round": round_no}
                run.update(
                    infer_per_s=figures["Inferences/Second"],
                    p50_us=figures["p50 latency"],
                    p99_us=figures["p99 latency"],
                    server_queue_us=figures.get("Server Queue"),
                    server_compute_us=figures.get("Server Compute Infer"),
                )
                runs.append(run)
                console.print(
                    f"round {round_no} c{concurrency:<3} {row.name:<19} {run['infer_per_s']:8,.0f} infer/s  "
                    f"p50 {run['p50_us'] / 1000:6.2f} ms  p99 {run['p99_us'] / 1000:6.2f} ms"
                )
    return runs


# --- report -----------------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> Summary:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["row"], run["concurrency"]), []).append(run)
    summary: Summary = {}
    for key, group in groups.items():
        rates = [r["infer_per_s"] for r in group]
        queue = [r["server_queue_us"] for r in group if r["server_queue_us"] is not None]
        compute = [r["server_compute_us"] for r in group if r["server_compute_us"] is not None]
        summary[key] = {
            "rounds": len(group),
            "infer_per_s": statistics.median(rates),
            "infer_per_s_min": min(rates),
            "infer_per_s_max": max(rates),
            "p50_ms": statistics.median(r["p50_us"] for r in group) / 1000,
            "p99_ms": statistics.median(r["p99_us"] for r in group) / 1000,
            "server_queue_us": statistics.median(queue) if queue else None,
            "server_compute_us": statistics.median(compute) if compute else None,
        }
    return summary


def targets(summary: Summary) -> list[dict[str, Any]]:
    """The issue's targets: the node against MLServer (same client mode, same bytes), gRPC against HTTP."""
    found: list[tuple[str, float, float, bool]] = []  # (target, value, threshold, at least)
    for ours in ("edgegen http json", "edgegen http"):
        label = "generic mode both" if ours.endswith("json") else "standard mode ÷ MLServer generic"
        one, theirs1 = summary.get((ours, 1)), summary.get(("mlserver http json", 1))
        many, theirs64 = summary.get((ours, 64)), summary.get(("mlserver http json", 64))
        if one and theirs1:
            rate = one["infer_per_s"] / theirs1["infer_per_s"]
            found.append((f"c1 infer/s ≥ 1.2× MLServer ({label})", rate, 1.2, True))
            found.append((f"c1 p99 ≤ MLServer's ({label})", one["p99_ms"] / theirs1["p99_ms"], 1.0, False))
        if many and theirs64:
            rate = many["infer_per_s"] / theirs64["infer_per_s"]
            found.append((f"c64 infer/s ≥ 2× MLServer ({label})", rate, 2.0, True))
    grpc, http = summary.get(("edgegen grpc", 1)), summary.get(("edgegen http", 1))
    if grpc and http:
        found.append(("c1 p50 gRPC ≤ 1.1× HTTP binary", grpc["p50_ms"] / http["p50_ms"], 1.1, False))
    return [
        {
            "target": name,
            "value": value,
            "threshold": threshold,
            "met": value >= threshold if least else value <= threshold,
        }
        for name, value, threshold, least in found
    ]


def markdown(summary: Summary, rows: list[Row], levels: list[int], checks: list[dict[str, Any]]) -> str:
    lines = [
        "| row | perf_analyzer mode | conc | infer/s | min–max | p50 ms | p99 ms | server queue µs | "
        "server compute µs |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in levels:
        for row in rows:
            s = summary.get((row.name, c))
            if s:
                lines.append(
                    f"| {row.name} | {row.mode} | {c} | {s['infer_per_s']:,.0f} | "
                    f"{s['infer_per_s_min']:,.0f}–{s['infer_per_s_max']:,.0f} | {s['p50_ms']:.2f} | "
                    f"{s['p99_ms']:.2f} | {_fmt(s['server_queue_us'])} | {_fmt(s['server_compute_us'])} |"
                )
    lines += ["", "| target | value | met |", "|---|--:|---|"]
    for check in checks:
        lines.append(f"| {check['target']} | {check['value']:.2f} | {'yes' if check['met'] else '**no**'} |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


# --- main -------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every row × concurrency")
    parser.add_argument("--window-ms", type=int, default=2000, help="each of the three measured windows")
    parser.add_argument("--warmup-ms", type=int, default=300, help="each of the three warm-up windows")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated concurrent clients")
    parser.add_argument("--home", type=Path, help="where the models and servers live (default: a temp dir)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    tool, mlserver_bin = ensure_perf_analyzer(), ensure_mlserver()
    result = new_result()
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["tools"] = {"perf_analyzer": tool.version(), "mlserver": MLSERVER, "onnxruntime": ort.__version__}
    console.print("[bold]machine[/]", result["machine"], result["tools"])
    with contextlib.ExitStack() as stack:
        home = args.home or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgegen-triton-")))
        home.mkdir(parents=True, exist_ok=True)
        ensure_models(home)
        model = model_file(home, MODEL, "model.onnx")
        images = np.ascontiguousarray(sample_inputs(INPUTS), dtype=np.float32)
        expected = session(model).run(["logits"], {"input": images})[0]
        standard, generic = write_inputs(images, home)
        data = {"standard": standard, "generic": generic}
        (ours, ours_grpc), (ours_auth, _) = node(home, "edgegen", False), node(home, "edgegen-auth", True)
        keys = KeyStore(Path(ours_auth.env["EDGEGEN_HOME"]) / "security" / "keys.sqlite")
        key = keys.create("user", label="bench")[0]
        keys.close()
        theirs, theirs_grpc = mlserver(home, mlserver_bin, model)
        rows = [
            Row("edgegen http", ours, "http", "standard", ours.port),
            Row("edgegen grpc", ours, "grpc", "standard", ours_grpc),
            Row("edgegen http auth", ours_auth, "http", "standard", ours_auth.port, key=key),
            Row("edgegen http json", ours, "http", "generic", ours.port),
            Row("mlserver http json", theirs, "http", "generic", theirs.port),
        ]
        logs = home / "logs"
        logs.mkdir(exist_ok=True)
        servers = [ours, ours_auth, theirs]
        try:
            for server in servers:  # one at a time, so that the start-up times are not contended
                start(server, logs)
                console.print(f"started {server.name} on :{server.port} in {server.startup_s:.2f} s")
            for row in rows:
                row.checked = check_answers(row, images, expected)
            result["mlserver_standard_mode"] = {
                protocol: standard_mode_error(tool, port, protocol, standard)
                for protocol, port in (("http", theirs.port), ("grpc", theirs_grpc))
            }
            console.print("MLServer in perf_analyzer's standard mode:", result["mlserver_standard_mode"])
            runs = rounds(tool, rows, levels, args, data)
            for server in servers:
                server.memory = memory_of(server)
        finally:
            for server in servers:
                stop(server)

    summary = summarize(runs)
    checks = targets(summary)
    table = markdown(summary, rows, levels, checks)
    result.update(
        rows={r.name: r.record(data) for r in rows},
        servers={
            s.name: {"command": s.command, "startup_s": s.startup_s, "memory": s.memory} for s in servers
        },
        runs=runs,
        summary=[{"row": k[0], "concurrency": k[1], **v} for k, v in summary.items()],
        targets=checks,
        markdown=table,
    )
    console.print("\n[bold]Markdown[/]\n")
    print(table)
    console.print(f"\nresults: {save_result('triton-clients', result)}")


if __name__ == "__main__":
    main()
