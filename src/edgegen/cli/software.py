"""`edgegen software`: edgegen's own upgrades, signed here and run by the nodes (node/software.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgegen.cli.options import ConfigOpt, WheelArg, err, friendly, node_settings, out

app = typer.Typer(no_args_is_help=True, help="edgegen's own upgrades: signed wheels, environments.")


@app.command("sign")
@friendly
def software_sign(
    wheel: WheelArg,
    key: Annotated[
        Path | None, typer.Option(help="an Ed25519 private key, PEM (default: this machine's signing key)")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Sign a wheel for the fleet's nodes (WHEEL.sig beside it); nodes trust the key's public half."""
    from edgegen.security.signing import Signer

    signer = Signer.load(key) if key else Signer.local(node_settings(config).home)
    target = wheel.with_name(wheel.name + ".sig")
    target.write_bytes(signer.record(wheel.read_bytes()))
    err.print(f"{target} written (key {signer.key_id})")


@app.command("status")
@friendly
def software_status(config: ConfigOpt = None) -> None:
    """This node's edgegen environments (JSON): current, previous, on trial, the last failure."""
    from edgegen.node import software

    home = node_settings(config).home
    view = software.read_state(home) | {"environments": software.environments(home)}
    out.print(json.dumps(view, indent=2), markup=False, highlight=False, soft_wrap=True)
