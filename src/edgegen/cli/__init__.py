"""The `edgegen` command. Errors print one line and exit non-zero; no tracebacks.

One module per command group, each a thin layer over the library: it reads its options (the shared ones
declared once in `options`), calls what does the work, and prints what came of it. This module only
assembles them, in the order `edgegen --help` lists them:

    serve, gateway       serve.py      run a node or a gateway under uvicorn
    optimize             optimize.py   a recipe in, packages and a report out
    models               models.py     the model store
    keys, pki            keys.py, pki.py   API keys; the fleet's CA
    audit, logs, admin   audit.py, logs.py, admin.py   the fleet, through its gateway (gateway/client.py)
    deploy, software     deploy.py, software.py   a systemd unit; edgegen's own upgrades

Heavy libraries (torch, onnxruntime, uvicorn, the store's) are imported inside the commands that use
them, so `edgegen --help` and every command start fast.
"""

from __future__ import annotations

import sys

import typer

from edgegen.cli import admin, audit, deploy, keys, logs, models, optimize, pki, serve, software

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Serve models on edge nodes.")
app.command()(serve.serve)
app.command()(serve.gateway)
app.command()(optimize.optimize)
app.add_typer(models.app, name="models")
app.add_typer(keys.app, name="keys")
app.add_typer(pki.app, name="pki")
app.add_typer(audit.app, name="audit")
app.add_typer(logs.app, name="logs")
app.add_typer(admin.app, name="admin")
app.add_typer(deploy.app, name="deploy")
app.add_typer(software.app, name="software")


def main() -> None:
    """The `edgegen` entry point: Ctrl-C exits with status 130, as a shell expects, not a traceback."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
