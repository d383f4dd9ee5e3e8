"""Restarting a node in place (`POST /admin/restart`), without a supervisor's help.

One process: the route sets `RESTART` and asks the uvicorn server the CLI runs (`SERVER`) to exit; it
shuts down gracefully (stops accepting, lets in-flight requests finish, runs the app's shutdown), and
the CLI replaces the process with a fresh one of the same command line (`after_exit`). (A signal
would not do: uvicorn re-raises SIGTERM once it has stopped, and the process would end there.) Several
worker processes: the route sends the supervisor SIGHUP, and uvicorn replaces the workers one by one
while the others keep serving on the shared socket.

A software switch (node/software.py) stops the whole server the same way — the supervisor too, with
several workers — and `after_exit` replaces the process with the interpreter of the environment asked
for; a new version that fails to start goes back to the current one there as well.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import uvicorn

from edgegen.node import software

log = logging.getLogger("edgegen.node")
RESTART = threading.Event()
SERVER: uvicorn.Server | None = None  # the one-process server, as the CLI started it


def can_restart(multiprocess: bool) -> bool:
    """Whether this process knows how to restart itself (it runs under `edgegen serve`)."""
    return multiprocess or SERVER is not None


def top_pid(multiprocess: bool) -> int:
    """The process that runs on after the server stops: the supervisor's, with several workers."""
    return os.getppid() if multiprocess else os.getpid()


def request_restart(multiprocess: bool) -> None:
    if multiprocess:
        log.info("restart requested: the supervisor replaces the workers one by one")
        os.kill(os.getppid(), signal.SIGHUP)
        return
    log.info("restart requested: graceful shutdown, then the same command again")
    RESTART.set()
    request_exit(multiprocess)


def request_exit(multiprocess: bool) -> None:
    """Stop serving gracefully; `after_exit` decides what this process becomes."""
    if multiprocess:
        os.kill(os.getppid(), signal.SIGTERM)
        return
    assert SERVER is not None, "checked by can_restart"
    SERVER.should_exit = True


def after_exit(home: Path, *, failed_start: bool) -> None:
    """After the server stopped: become the environment a software switch asked for (or, when a new
    version on trial failed to start, the current one again), or a new process of the same command if
    a restart was asked for; else return, and the process ends."""
    python = software.exec_target(home)
    if (
        python is None
        and failed_start
        and software.abandon(home, "the new version failed to start", os.getpid())
    ):
        python = software.exec_target(home)
    sys.stdout.flush()
    sys.stderr.flush()
    if python is not None:
        become(python)
    if RESTART.is_set():
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 (our own command line)  # nosec B606


def become(python: Path) -> None:
    """Replace this process with `python` running the same edgegen command."""
    log.info("software switch: starting the other environment", extra={"python": str(python)})
    os.execv(python, [str(python), "-m", "edgegen", *sys.argv[1:]])  # noqa: S606 (our environments)  # nosec B606
