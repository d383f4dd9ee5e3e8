"""`edgegen deploy`: files that install this environment's edgegen as a service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgegen.cli.options import err, friendly, out

app = typer.Typer(no_args_is_help=True, help="Deployment files: a hardened systemd unit.")


@app.command("systemd")
@friendly
def deploy_systemd(
    gateway: Annotated[
        bool, typer.Option("--gateway", help="a unit for the gateway (default: a node)")
    ] = False,
    name: Annotated[str | None, typer.Option(help="unit and state directory name")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="port (default 8000, gateway 8080)")] = None,
    workers: Annotated[int, typer.Option(help="node server processes")] = 1,
    config: Annotated[Path | None, typer.Option(help="a TOML config the service reads")] = None,
    output: Annotated[Path | None, typer.Option(help="write here instead of stdout")] = None,
) -> None:
    """Print a hardened systemd unit that runs this environment's edgegen as a node or a gateway."""
    from edgegen.deploy import systemd_unit

    unit = systemd_unit(gateway=gateway, name=name, host=host, port=port, workers=workers, config=config)
    if output is None:
        out.print(unit, end="", markup=False, highlight=False, soft_wrap=True)
    else:
        output.write_text(unit)
        err.print(f"wrote {output}")
