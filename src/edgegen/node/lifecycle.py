"""What a node's process becomes once its server stops (http/serving.py runs and restarts the server).

A software switch (node/software.py) stops the whole server the way a restart does — the supervisor
too, with several workers — and `after_exit` replaces the process with the interpreter of the
environment asked for; a new version that fails to start goes back to the current one there as well.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from edgegen.http.serving import replace_process
from edgegen.node import software

log = logging.getLogger("edgegen.node")


def after_exit(home: Path, failed_start: bool) -> None:
    """After the server stopped: become the environment a software switch asked for (or, when a new
    version on trial failed to start, the current one again); else return (and the server's restart,
    if one was asked for, follows)."""
    python = software.exec_target(home)
    if (
        python is None
        and failed_start
        and software.abandon(home, "the new version failed to start", os.getpid())
    ):
        python = software.exec_target(home)
    if python is not None:
        become(python)


def become(python: Path) -> None:
    """Replace this process with `python` running the same edgegen command."""
    log.info("software switch: starting the other environment", extra={"python": str(python)})
    replace_process(str(python), ["-m", "edgegen", *sys.argv[1:]])
