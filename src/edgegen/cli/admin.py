"""`edgegen admin`: manage the fleet through its gateway (restarts, settings, rollouts, upgrades).

Each command is one call to the gateway, which does the work node by node; the command reports what
each node did. Everything the gateway or a node sent is shown escaped (`edgegen.terminal`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from edgegen.cli.options import (
    GATEWAY_URL,
    AdminKeyOpt,
    CaOpt,
    GatewayUrlOpt,
    KeyOpt,
    WheelArg,
    err,
    friendly,
    out,
)
from edgegen.errors import EdgegenError
from edgegen.gateway.client import GatewayClient
from edgegen.terminal import shown

app = typer.Typer(no_args_is_help=True, help="Manage the fleet through its gateway.")
config_app = typer.Typer(no_args_is_help=True, help="Nodes' settings: read, change (validated, persisted).")
app.add_typer(config_app, name="config")


@app.command("restart")
@friendly
def admin_restart(
    node: Annotated[
        str | None, typer.Argument(help="the node's name in the gateway (default: every node)")
    ] = None,
    gateway_url: GatewayUrlOpt = GATEWAY_URL,
    key: AdminKeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """Restart a node (or every node, one after another) without dropping a request: drained first."""
    path = f"/gateway/nodes/{quote(node, safe='')}/restart" if node else "/gateway/restart"
    answer = GatewayClient(gateway_url, key, ca).call("POST", path)
    for result in answer.get("restarted", [answer]):
        took = f"drained in {result['drained_s']} s, back in {result['took_s']} s"
        err.print(f"{shown(result['node'])}: {took}")
    if "failed" in answer:
        failed = answer["failed"]
        err.print(
            f"[red]stopped at {shown(failed['node'])}[/red] ({failed['status']}): {shown(failed['reason'])}",
            highlight=False,
        )
        raise typer.Exit(1)


@config_app.command("get")
@friendly
def admin_config_get(
    node: Annotated[str, typer.Argument(help="the node's name in the gateway")],
    gateway_url: GatewayUrlOpt = GATEWAY_URL,
    key: KeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """A node's settings in force (JSON; secrets as stars) and those changed remotely."""
    answer = GatewayClient(gateway_url, key, ca).get(f"/gateway/config/{quote(node, safe='')}")
    out.print(json.dumps(answer, indent=2), markup=False, highlight=False, soft_wrap=True)


@config_app.command("set")
@friendly
def admin_config_set(
    changes: Annotated[list[str], typer.Argument(help="SETTING=VALUE, e.g. cache.ttl_s=60 log_level=debug")],
    node: Annotated[list[str] | None, typer.Option(help="only these nodes (repeat; default: all)")] = None,
    gateway_url: GatewayUrlOpt = GATEWAY_URL,
    key: AdminKeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """Change settings on the fleet's nodes: validated, persisted, applied at once where they can be."""
    parsed: dict[str, Any] = {}
    for item in changes:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise EdgegenError(f"{item!r}: give SETTING=VALUE")
        try:
            parsed[name] = json.loads(text)  # numbers, true/false; anything else is a string
        except json.JSONDecodeError:
            parsed[name] = text
    gateway = GatewayClient(gateway_url, key, ca)
    answer = gateway.call("PATCH", "/gateway/config", {"changes": parsed, "nodes": node})
    for name, result in answer["nodes"].items():
        later = f"; at the next restart: {', '.join(result['on_restart'])}" if result["on_restart"] else ""
        err.print(shown(f"{name}: applied {', '.join(result['applied']) or 'nothing yet'}{later}"))


@app.command("rollout")
@friendly
def admin_rollout(
    model: Annotated[str, typer.Argument(help="the model to change")],
    version: Annotated[str | None, typer.Option(help="a version the nodes hold")] = None,
    url: Annotated[
        str | None, typer.Option(help="a signed package each node pulls (an allowed source)")
    ] = None,
    package: Annotated[
        Path | None,
        typer.Option(
            help="a signed package archive (models export) the gateway pushes to each node", exists=True
        ),
    ] = None,
    node: Annotated[list[str] | None, typer.Option(help="only these nodes, in this order (repeat)")] = None,
    gateway_url: GatewayUrlOpt = GATEWAY_URL,
    key: AdminKeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """Roll a model version out, node by node, behind a health gate; a failure rolls every node back.
    With --package, --version names the version the nodes file it under (default: their next)."""
    if package is None:
        order = {"model": model, "version": version, "url": url, "nodes": node}
        _report_rollout(GatewayClient(gateway_url, key, ca).call("POST", "/gateway/rollout", order))
        return
    if url is not None:
        raise EdgegenError("give --package or --url, not both")
    gateway = GatewayClient(gateway_url, key, ca)
    with package.open("rb") as data:
        path = f"/gateway/models/{quote(model, safe='')}/rollout"
        nodes = ",".join(node) if node else None
        answer = gateway.upload(path, data, version=version, nodes=nodes)
    _report_rollout(answer)


@app.command("rollback")
@friendly
def admin_rollback(
    model: Annotated[str, typer.Argument(help="the model to change")],
    version: Annotated[
        str | None, typer.Option(help="this version (default: before the last rollout)")
    ] = None,
    gateway_url: GatewayUrlOpt = GATEWAY_URL,
    key: AdminKeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """Put the versions served before the last rollout back (or roll `--version` out)."""
    order = {"model": model, "version": version}
    _report_rollout(GatewayClient(gateway_url, key, ca).call("POST", "/gateway/rollback", order))


@app.command("upgrade")
@friendly
def admin_upgrade(
    wheel: WheelArg,
    signature: Annotated[
        Path | None, typer.Option(help="its signature (default: WHEEL.sig, from `edgegen software sign`)")
    ] = None,
    node: Annotated[list[str] | None, typer.Option(help="only these nodes, in this order (repeat)")] = None,
    gateway_url: GatewayUrlOpt = GATEWAY_URL,
    key: AdminKeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """Upgrade edgegen on the nodes, one at a time, each health-gated; a failure puts every node back."""
    signature = signature or wheel.with_name(wheel.name + ".sig")
    if not signature.is_file():
        raise EdgegenError(f"no signature at {signature}: sign the wheel with `edgegen software sign`")
    headers = {"X-Edgegen-Wheel": wheel.name, "X-Edgegen-Signature": signature.read_text().strip()}
    nodes = ",".join(node) if node else None
    answer = GatewayClient(gateway_url, key, ca).upload(
        "/gateway/upgrade", wheel.read_bytes(), headers, nodes=nodes
    )
    _report_rollout(answer, "env")


def _report_rollout(answer: dict[str, Any], what: str = "version") -> None:
    """A rollout's or an upgrade's answer, node by node (`what`: the field that says what each runs)."""
    for step in answer.get("nodes", []):
        err.print(shown(f"{step['node']}: {step['previous']} -> {step[what]} ({step.get('took_s', 0)} s)"))
    if "failed" in answer:
        stopped = f"[red]stopped at {shown(answer['failed'])}:[/red] {shown(answer['reason'])}"
        err.print(stopped, highlight=False)
    for step in answer.get("rolled_back", []):
        err.print(
            shown(f"{step['node']}: back to {step[what]}")
            + ("" if step["restored"] else " [red]FAILED[/red]")
        )
    if not answer["ok"]:
        raise typer.Exit(1)
