"""Servers for the LLM benchmark: start one in its own process group, wait for ready, measure, stop.

Used by bench/llm.py. A server is started once per run; its start-to-ready time and the memory of its
process tree (RSS, and PSS, which counts shared and file-backed pages once) are recorded here.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class Server:
    """One server under test: how to start it and which GET path answers 200 once the model is loaded."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    port: int
    model: str  # the `model` field its requests carry
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


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any EDGEGEN_* setting of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEGEN_")}
    env.update(extra)
    return env


def http_get_status(port: int, path: str, timeout: float = 2.0) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def start(server: Server, logs: Path, timeout_s: float = 180.0) -> None:
    """Start the server in a new session (its own process group); wait until ready and time it."""
    server.log = logs / f"{server.name}.log"
    with server.log.open("wb") as out:
        started = time.perf_counter()
        server.process = subprocess.Popen(
            server.command, env=server.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    while time.perf_counter() - started < timeout_s:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}: {tail(server.log)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_get_status(server.port, server.ready_path) == 200:
                server.startup_s = time.perf_counter() - started
                return
        time.sleep(0.01)
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


def memory_of(server: Server) -> dict[str, int]:
    """RSS and PSS summed over the server's process tree."""
    assert server.process is not None
    root = psutil.Process(server.process.pid)
    processes = [root, *root.children(recursive=True)]
    rss = pss = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            info = process.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", 0)
    return {"rss": rss, "pss": pss, "processes": len(processes)}
