"""Start a real `edgegen serve` or `edgegen gateway` on 127.0.0.1, wait until it is ready, always stop it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import psutil

from edgegen.security.keys import KeyStore

P = TypeVar("P", bound="NodeProcess")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(node: NodeProcess, prefix: str) -> float:
    """The value of the first sample on the node's /metrics whose line starts with `prefix` (0 if none)."""
    for line in httpx.get(f"{node.url}/metrics", verify=node.verify).text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


YOUNG_COLLECTIONS = 'python_gc_collections_total{generation="0"}'  # (observe/heap.py)


def predict_together(process: NodeProcess, pixels: list[float], clients: int, rounds: int) -> None:
    """`rounds` times, `clients` seed predictions sent at once, each on its own connection; all answered."""

    async def send() -> None:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(
            base_url=process.url, headers=process.headers, verify=process.verify, limits=limits
        ) as client:
            for _ in range(rounds):
                body = {"input_data": pixels}
                answers = await asyncio.gather(*(client.post("/predict", json=body) for _ in range(clients)))
                assert all(a.status_code == 200 for a in answers)

    asyncio.run(send())


def worker_processes(process: NodeProcess) -> list[psutil.Process]:
    """The live worker processes under a `--workers N` server's supervisor: not a worker killed that the
    supervisor has yet to reap (a zombie, whose command line cannot be read), nor one gone meanwhile."""
    assert process.process is not None
    workers = []
    for child in psutil.Process(process.process.pid).children():
        with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
    return workers


def tenant_headers(home: Path, tenant: str) -> dict[str, str]:
    """Headers carrying a new user key of `tenant`, made in the node's key store."""
    store = KeyStore(home / "security" / "keys.sqlite")
    try:
        return {"Authorization": f"Bearer {store.create('user', tenant=tenant)[0]}"}
    finally:
        store.close()


class NodeProcess:
    """A node; with `auth=False` (tests of other things) it runs with authentication explicitly off,
    with `auth=True` an admin key is created in its home first (`admin_key`, `headers`)."""

    command = "serve"
    env_prefix = "EDGEGEN_"
    scheme = "http"
    verify: ssl.SSLContext | bool = True  # what clients check an https server's certificate against

    def __init__(
        self,
        home: Path,
        *args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        auth: bool = False,
    ) -> None:
        self.home = home
        self.port = port or free_port()
        self.args = args
        own = {f"{self.env_prefix}HOME": str(home), f"{self.env_prefix}SECURITY__AUTH": str(auth).lower()}
        self.env = {**os.environ, "EDGEGEN_HOME": str(home), **own, **(env or {})}
        self.admin_key = admin_key(home) if auth else ""
        self.headers = {"Authorization": f"Bearer {self.admin_key}"} if auth else {}
        self.log_path = home / f"node-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60, *, ready: bool = True) -> NodeProcess:
        """Start and wait until ready (or, with `ready=False`, until merely live: for a node that is
        expected never to be ready)."""
        command = [sys.executable, "-m", "edgegen", self.command, "--port", str(self.port), *self.args]
        self.started_at = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.ready_probe() if ready else self.live_probe():
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"node not ready after {timeout} s:\n{self.log()[-3000:]}")

    def ready_probe(self) -> bool:
        return httpx.get(f"{self.url}/v2/health/ready", timeout=1, verify=self.verify).status_code == 200

    def live_probe(self) -> bool:
        return httpx.get(f"{self.url}/v2/health/live", timeout=1, verify=self.verify).status_code == 200

    def kill(self) -> None:
        """SIGKILL, as a crash: no graceful shutdown."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextlib.contextmanager
def running(process: P, expected: tuple[str, ...] = ()) -> Iterator[P]:
    """Start a process, yield it, always stop it; then its log must hold no error of its own (but
    those the test caused on purpose: lines holding one of `expected`)."""
    process.start()
    try:
        yield process
    finally:
        process.stop()
    assert_no_errors(process, expected)


def assert_no_errors(process: NodeProcess, expected: tuple[str, ...] = ()) -> None:
    """Whatever the tests sent, the server must not have hit an error of its own."""
    errors = [
        line
        for line in process.log().splitlines()
        if '"level":"error"' in line and not any(text in line for text in expected)
    ]
    assert not errors, errors[:3]


def gateway_config(path: Path, nodes: list[NodeProcess], extra: str = "") -> Path:
    """A gateway's config for `nodes` (named n0, n1, …): health checked every 0.2 s, statuses read every
    0.5 s, then `extra` (more TOML tables)."""
    path.write_text(
        "".join(f'[[nodes]]\nurl = "{n.url}"\nname = "n{i}"\n' for i, n in enumerate(nodes))
        + "[health]\ninterval_s = 0.2\ntimeout_s = 0.5\nstatus_interval_s = 0.5\n"
        + extra
    )
    return path


class GatewayProcess(NodeProcess):
    """`edgegen gateway --config FILE`; ready when some node can take traffic."""

    command = "gateway"
    env_prefix = "EDGEGEN_GATEWAY_"


def admin_key(home: Path) -> str:
    """An admin API key in the key store under `home` (what `edgegen keys create --role admin` does)."""
    store = KeyStore(home / "security" / "keys.sqlite")
    try:
        return store.create("admin", label="tests")[0]
    finally:
        store.close()
