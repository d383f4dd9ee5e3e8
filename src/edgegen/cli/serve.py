"""`edgegen serve` and `edgegen gateway`: check the settings, then run the server under uvicorn.

A node may restart in place (http/serving.py) or become another software environment when its server
returns (node/lifecycle.py); a gateway simply stops.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from edgegen.cli.options import ConfigOpt, InsecureOpt, StoreOpt, err, friendly, node_settings
from edgegen.config import Settings
from edgegen.errors import EdgegenError


@friendly
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="address to listen on", envvar="EDGEGEN_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on", envvar="EDGEGEN_PORT")] = None,
    workers: Annotated[int | None, typer.Option(help="server processes", envvar="EDGEGEN_WORKERS")] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="KServe v2 gRPC port (0: off)", envvar="EDGEGEN_GRPC_PORT")
    ] = None,
    store: StoreOpt = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug|info|warning|error", envvar="EDGEGEN_LOG_LEVEL")
    ] = None,
    insecure: InsecureOpt = False,
) -> None:
    """Start a node serving every active model in the store."""
    from edgegen.observe.logs import configure_logging

    if insecure:
        os.environ["EDGEGEN_SECURITY__INSECURE"] = "true"
    settings = node_settings(
        config, host=host, port=port, workers=workers, grpc_port=grpc_port, store=store, log_level=log_level
    )
    _check_exposure(settings.host, settings.security, settings.tls)
    configure_logging(settings.log_level)
    _move_to_software(settings)
    _announce_auth(settings)
    if settings.workers > 1:
        run_dir = settings.home / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-", dir=run_dir)
    _run_server(
        "edgegen.node.app",
        settings.host,
        settings.port,
        settings.workers,
        tls=settings.tls.enabled,
        home=settings.home,
    )


@friendly
def gateway(
    config: Annotated[
        Path | None,
        typer.Option(help="gateway TOML: nodes, balancer, health", envvar="EDGEGEN_GATEWAY_CONFIG"),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="address to listen on", envvar="EDGEGEN_GATEWAY_HOST")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on", envvar="EDGEGEN_GATEWAY_PORT")] = None,
    workers: Annotated[
        int | None, typer.Option(help="server processes, one fleet", envvar="EDGEGEN_GATEWAY_WORKERS")
    ] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="KServe v2 gRPC port (0: off)", envvar="EDGEGEN_GATEWAY_GRPC_PORT")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug|info|warning|error", envvar="EDGEGEN_GATEWAY_LOG_LEVEL")
    ] = None,
    insecure: InsecureOpt = False,
) -> None:
    """Start a gateway that balances the fleet's nodes behind one address."""
    from edgegen.gateway.settings import load_gateway_settings
    from edgegen.observe.logs import configure_logging

    flags = {"CONFIG": config, "HOST": host, "PORT": port, "WORKERS": workers, "GRPC_PORT": grpc_port,
             "LOG_LEVEL": log_level}  # fmt: skip
    for key, value in flags.items():
        if value is not None:
            os.environ[f"EDGEGEN_GATEWAY_{key}"] = str(value)
    if insecure:
        os.environ["EDGEGEN_GATEWAY_SECURITY__INSECURE"] = "true"
    settings = load_gateway_settings()  # fail here, in one line, before the server starts
    _check_exposure(settings.host, settings.security, settings.tls)
    configure_logging(settings.log_level)
    if settings.workers == 1:
        _run_server("edgegen.gateway.app", settings.host, settings.port, tls=settings.tls.enabled)
        return
    from edgegen.gateway.shared import SHARED_DIR

    # The workers' one fleet and their metrics live in a directory of this run's own (gateway/shared.py).
    run_dir = settings.home / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    shared = Path(tempfile.mkdtemp(prefix="gateway-", dir=run_dir))
    (shared / "metrics").mkdir()
    os.environ[SHARED_DIR] = str(shared)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared / "metrics")
    try:
        _run_server(
            "edgegen.gateway.app", settings.host, settings.port, settings.workers, tls=settings.tls.enabled
        )
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _move_to_software(settings: Settings) -> None:
    """Run the environment this node's software state names (an upgrade, its trial, or a way back)."""
    from edgegen.node import lifecycle, software

    python = software.boot(settings)
    if python is not None:
        lifecycle.become(python)


def _check_exposure(host: str, security: Any, tls: Any) -> None:
    from edgegen.security.settings import exposure_problem

    problem = exposure_problem(host, security, tls)
    if problem is not None:
        raise EdgegenError(problem)
    if security.insecure and not (tls.enabled and security.auth):
        err.print(f"[yellow]warning:[/yellow] listening on {host} without TLS or auth (--insecure)")


def _announce_auth(settings: Settings) -> None:
    """Say how callers authenticate, and how to make the first admin key when there is none."""
    from edgegen.security.keys import KeyStore

    if not settings.security.auth:
        err.print("[yellow]authentication is off[/yellow] (security.auth = false): every caller is admin")
        return
    store = KeyStore(settings.keys_file)
    try:
        has_admin = any(k.role == "admin" and k.revoked is None for k in store.list())
    finally:
        store.close()
    err.print("every route but /v2/health/* and /metrics needs 'Authorization: Bearer <API key or JWT>'")
    if not has_admin:
        command = sys.argv[0] if Path(sys.argv[0]).name == "edgegen" else f"{sys.executable} -m edgegen"
        err.print(
            "no admin key yet; create the first one (shown once) with:\n"
            f"  EDGEGEN_HOME={settings.home} {command} keys create --role admin --label first-admin",
            highlight=False,
            soft_wrap=True,
        )


def _run_server(
    module: str, host: str, port: int, workers: int = 1, *, tls: bool = False, home: Path | None = None
) -> None:
    """Serve `module` (http/serving.py); a node (`home`) may then become another software environment
    (node/lifecycle.py). A server that could not start is exit status 3."""
    import functools

    from edgegen.http import serving
    from edgegen.node import lifecycle

    after_exit = functools.partial(lifecycle.after_exit, home) if home is not None else None
    if not serving.run(module, host, port, workers, tls=tls, after_exit=after_exit):
        raise typer.Exit(3)  # it could not start (uvicorn said why)
