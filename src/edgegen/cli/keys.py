"""`edgegen keys`: the node's API keys, made and revoked where the node's home is."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgegen.cli.options import ConfigOpt, err, friendly, node_settings, out
from edgegen.terminal import shown

app = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, revoke.")


def _keys(config: Path | None) -> Any:
    from edgegen.security.keys import KeyStore

    return KeyStore(node_settings(config).keys_file)


@app.command("create")
@friendly
def keys_create(
    role: Annotated[str, typer.Option(help="user | operator | admin")] = "user",
    models: Annotated[
        str | None, typer.Option(help="comma-separated models it may use (default: all)")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="the tenant it belongs to")] = None,
    label: Annotated[str, typer.Option(help="a note for `keys list`")] = "",
    config: ConfigOpt = None,
) -> None:
    """Create a key and print it, alone, on stdout: it is shown this once and stored only hashed."""
    names = tuple(m.strip() for m in models.split(",")) if models is not None else None
    token, key = _keys(config).create(role, models=names, tenant=tenant, label=label)
    err.print(f"created key {key.id} ({key.role}); it is shown once, below")
    sys.stdout.write(token + "\n")


@app.command("list")
@friendly
def keys_list(config: ConfigOpt = None) -> None:
    """Every key's id, role, scope and state; never a secret."""
    table = Table("id", "role", "models", "tenant", "label", "state")
    for key in _keys(config).list():
        models = ",".join(key.models) if key.models else "all"
        state = "revoked" if key.revoked else "valid"
        cells = (key.id, key.role, models, key.tenant or "-", key.label, state)
        table.add_row(*map(shown, cells))
    out.print(table)


@app.command("revoke")
@friendly
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the id `keys list` shows")], config: ConfigOpt = None
) -> None:
    """Revoke a key at once; requests carrying it are refused from then on."""
    key = _keys(config).revoke(key_id)
    err.print(f"revoked key {key.id} ({key.role})")
