"""Run the image under podman: one node container started, waited for, signalled and always removed.

What the build machines need (runc, file and process limits) comes from deploy/podman/containers.conf
through CONTAINERS_CONF, as for `make image`; a CONTAINERS_CONF already set wins.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[2]
IMAGE = "edgegen:latest"
UID = 10001  # the image's user (deploy/docker/Dockerfile)
CONF = os.environ.get("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))
ENV = {**os.environ, "CONTAINERS_CONF": CONF}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One podman command; a failure raises with podman's own last words."""
    done = subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        said = done.stderr.strip()[-2000:]
        raise AssertionError(f"podman {' '.join(args[:2])} exited {done.returncode}: {said}")
    return done


def hand_over(path: Path) -> None:
    """Make `path` and all below it the image user's: the container writes its home as uid 10001."""
    os.chown(path, UID, UID)
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), UID, UID, follow_symlinks=False)


def copy_home(source: Path, dest: Path) -> None:
    """A copy of a prepared home (its model store) at `dest`, owned by the image's user."""
    shutil.copytree(source / "models", dest / "models", dirs_exist_ok=True)
    hand_over(dest)


class NodeContainer:
    """`edgegen serve` in the image, its home bind-mounted, its port published on the host's loopback,
    run as the compose file runs it: a read-only root and a tmpfs on /tmp."""

    def __init__(self, name: str, home: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.name, self.home, self.port = name, home, port
        self.env = {"EDGEGEN_LLM__THREADS": "2", **(env or {})}
        self.url = f"http://127.0.0.1:{port}"
        self.started_at = 0.0

    def start(self) -> NodeContainer:
        env = [f"--env={key}={value}" for key, value in self.env.items()]
        self.started_at = time.monotonic()
        podman("run", "--detach", f"--name={self.name}", "--read-only", "--tmpfs=/tmp",
               f"--volume={self.home}:/var/lib/edgegen", f"--publish=127.0.0.1:{self.port}:8000",
               *env, IMAGE, "node", "--insecure")  # fmt: skip
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until the image's own HEALTHCHECK passes (podman runs it on demand: no systemd timers here)."""
        deadline = time.monotonic() + timeout
        while podman("healthcheck", "run", self.name, check=False).returncode != 0:
            self.check_running()
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not healthy after {timeout} s:\n{self.logs()}")
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 60) -> float:
        """Until /v2/health/ready answers 200 (every model loaded); the seconds since `podman run`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return time.monotonic() - self.started_at
            except httpx.TransportError:
                pass
            self.check_running()
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.logs()}")
            time.sleep(0.05)

    def check_running(self) -> None:
        state = podman("inspect", "--format={{.State.Status}}", self.name).stdout.strip()
        if state != "running":
            raise AssertionError(f"{self.name} is {state}:\n{self.logs()}")

    def exec(self, *args: str, user: str = "", check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman("exec", *([f"--user={user}"] if user else []), self.name, *args, check=check)

    def create_key(self, role: str = "user") -> str:
        """A key made by the image's own CLI in the container's home (printed alone on stdout)."""
        return self.exec("edgegen", "keys", "create", f"--role={role}").stdout.strip()

    def kill(self, signal: str) -> None:
        podman("kill", f"--signal={signal}", self.name)

    def wait_exit(self, timeout: float = 90) -> int:
        return int(podman("wait", self.name, timeout=timeout).stdout.strip())

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return (done.stdout + done.stderr)[-4000:]

    def remove(self) -> None:
        podman("rm", "--force", "--time=0", self.name, check=False)
