"""`edgegen audit`: the fleet's vulnerability scan. Advisories are imported into the gateway's home from
an OSV export fetched elsewhere (a gateway need not reach the internet); the gateway matches them
against every node's installed packages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgegen.cli.options import GATEWAY_URL, CaOpt, GatewayUrlOpt, KeyOpt, err, friendly, out
from edgegen.gateway.client import GatewayClient
from edgegen.terminal import shown

app = typer.Typer(
    invoke_without_command=True,
    help="The fleet's vulnerability scan: import OSV advisories into the gateway, list what is affected.",
)
GatewayConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="gateway TOML", envvar="EDGEGEN_GATEWAY_CONFIG")
]


@app.command("import")
@friendly
def audit_import(
    file: Annotated[Path, typer.Argument(help="an OSV export (.zip) or OSV JSON (one record or a list)")],
    config: GatewayConfigOpt = None,
) -> None:
    """Import OSV advisories (fetched elsewhere, e.g. osv-vulnerabilities PyPI/all.zip) into the gateway."""
    from edgegen.gateway.settings import load_gateway_settings
    from edgegen.security.vulns import AdvisoryDb

    db = AdvisoryDb(load_gateway_settings(config).home / "security" / "advisories.sqlite")
    try:
        count = db.import_file(file)
        err.print(f"imported {count} PyPI package advisories from {file.name}; {db.count()} in all")
    finally:
        db.close()


@app.callback()
@friendly
def audit_fleet(
    context: typer.Context,
    gateway_url: GatewayUrlOpt = GATEWAY_URL,
    key: KeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """List every node's vulnerable packages (exit status 1 when there are any)."""
    if context.invoked_subcommand is not None:
        return
    report = GatewayClient(gateway_url, key, ca).get("/gateway/audit")
    if not report["advisories"]:
        err.print("no advisories imported yet: edgegen audit import FILE (an OSV export)")
    table = Table("node", "package", "version", "advisory", "fixed in")
    vulnerable = 0
    for node, result in report["nodes"].items():
        if "error" in result:
            table.add_row(shown(node), "-", "-", f"[red]not scanned: {shown(result['error'])}[/red]", "-")
            continue
        for finding in result["vulnerable"]:
            vulnerable += 1
            found = (finding["package"], finding["version"], finding["advisory"], finding["fixed"] or "-")
            cells = (node, *found)
            table.add_row(*map(shown, cells))
    out.print(table)
    err.print(f"{vulnerable} vulnerable package(s) across {len(report['nodes'])} scanned environment(s)")
    if vulnerable:
        raise typer.Exit(1)
