"""Servers under test, for every benchmark here: start one in its own process group, wait until it is
ready (and time that), measure its process tree, and always stop it. Also what every benchmark records
about the machine it ran on.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil


@dataclass
class Server:
    """One server: how to start it, and the path that answers 200 once it can serve."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    port: int
    cwd: Path | None = None
    ready_post: bytes | None = None  # POST this to ready_path instead of a GET
    check: str = "values"  # /predict bench: "shape" for the floor, whose answers are a constant
    model: str = ""  # LLM bench: the `model` field its requests carry
    process: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0
    log: Path | None = None
    memory: dict[str, int] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The baselines these benchmarks compare with have no authentication and no response cache: our servers
# run without them too, said explicitly (the workloads repeat their inputs, which a cache would answer).
# bench/security.py measures what authentication, rate limits and mutual TLS cost; bench/cache.py the cache.
LIKE_BASELINES = {
    "EDGEGEN_SECURITY__AUTH": "false",
    "EDGEGEN_GATEWAY_SECURITY__AUTH": "false",
    "EDGEGEN_CACHE__ENABLED": "false",
}


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without its EDGEGEN_* and SEED_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEGEN_", "SEED_"))}
    env.update(extra)
    return env


def http_status(port: int, path: str, body: bytes | None = None, timeout: float = 2.0) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if body is None:
            connection.request("GET", path)
        else:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


def start(server: Server, logs: Path, timeout_s: float = 180.0) -> None:
    """Start the server in a new session (its own process group); wait until ready and time it
    (a server with no `ready_path` is not waited for: something in front of it is)."""
    server.log = logs / f"{server.name}.log"
    with server.log.open("wb") as out:
        started = time.perf_counter()
        server.process = subprocess.Popen(
            server.command, cwd=server.cwd, env=server.env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    while server.ready_path and time.perf_counter() - started < timeout_s:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}: {tail(server.log)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_status(server.port, server.ready_path, server.ready_post) == 200:
                server.startup_s = time.perf_counter() - started
                return
        time.sleep(0.01)
    if not server.ready_path:
        return
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f} s: {tail(server.log)}")


def stop(server: Server) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it is still there."""
    process = server.process
    if process is None or process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait_s)
            return


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _tree(server: Server) -> list[psutil.Process]:
    assert server.process is not None
    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(server: Server) -> float:
    """User + system CPU time of the server's process tree so far (its load, not the load generator's)."""
    total = 0.0
    for process in _tree(server):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def memory_of(server: Server) -> dict[str, int]:
    """RSS and PSS (which counts shared and file-backed pages once) summed over the process tree."""
    processes = _tree(server)
    rss = pss = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            info = process.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", 0)
    return {"rss": rss, "pss": pss, "processes": len(processes)}


@contextlib.contextmanager
def home_dir(given: Path | None, prefix: str = "edgegen-bench-") -> Iterator[Path]:
    """`given` (created if needed), else a temp dir removed afterwards."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def machine_facts() -> dict[str, Any]:
    """Cores this process may use, the CPU's model name, Python, and the load when the run began."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def new_result() -> dict[str, Any]:
    """What every result file starts with: when (UTC, also its name), where, and the command."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return {"date": stamp, "machine": machine_facts(), "command": " ".join(sys.argv)}


def save_result(kind: str, result: dict[str, Any]) -> Path:
    """Write a benchmark's result to bench/results/<kind>-<its date>.json (not committed); return the path."""
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    out = results / f"{kind}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    return out
