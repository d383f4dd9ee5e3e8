"""Restarting a node in place (`POST /admin/restart`), without a supervisor's help.

One process: the route sets `RESTART` and asks the uvicorn server the CLI runs (`SERVER`) to exit; it
shuts down gracefully (stops accepting, lets in-flight requests finish, runs the app's shutdown), and
the CLI replaces the process with a fresh one of the same command line (`restart_if_asked`). (A signal
would not do: uvicorn re-raises SIGTERM once it has stopped, and the process would end there.) Several
worker processes: the route sends the supervisor SIGHUP, and uvicorn replaces the workers one by one
while the others keep serving on the shared socket.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import uvicorn

log = logging.getLogger("edgegen.node")
RESTART = threading.Event()
SERVER: uvicorn.Server | None = None  # the one-process server, as the CLI started it


def can_restart(multiprocess: bool) -> bool:
    """Whether this process knows how to restart itself (it runs under `edgegen serve`)."""
    return multiprocess or SERVER is not None


def request_restart(multiprocess: bool) -> None:
    if multiprocess:
        log.info("restart requested: the supervisor replaces the workers one by one")
        os.kill(os.getppid(), signal.SIGHUP)
        return
    assert SERVER is not None, "checked by can_restart"
    log.info("restart requested: graceful shutdown, then the same command again")
    RESTART.set()
    SERVER.should_exit = True


def restart_if_asked() -> None:
    """After the server stopped: become a new process of the same command, if a restart was asked for."""
    if RESTART.is_set():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 (our own command line)
