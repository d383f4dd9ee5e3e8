"""`edgegen pki`: the fleet's certificate authority, kept in the node's home (HOME/pki)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgegen.cli.options import ConfigOpt, err, friendly, node_settings
from edgegen.errors import EdgegenError

app = typer.Typer(no_args_is_help=True, help="The fleet's CA: device certificates for mutual TLS.")


def _pki(config: Path | None) -> Any:
    from edgegen.security.pki import Pki

    return Pki(node_settings(config).home / "pki")


HostsOpt = Annotated[
    list[str] | None, typer.Option("--host", help="a name or address it serves (repeatable)")
]


@app.command("init")
@friendly
def pki_init(config: ConfigOpt = None) -> None:
    """Create the CA (HOME/pki/ca.crt and its key, 0600)."""
    err.print(f"CA written to {_pki(config).init()}")


def _issue(config: Path | None, name: str, kind: str, role: str | None, hosts: list[str] | None) -> None:
    issued = _pki(config).issue(name, kind, role=role, hosts=tuple(hosts or ("127.0.0.1", "localhost")))
    err.print(f"{kind} certificate for {name} (role {issued.role}): {issued.cert}, key {issued.key}")


@app.command("issue-node")
@friendly
def pki_issue_node(name: str, host: HostsOpt = None, config: ConfigOpt = None) -> None:
    """A certificate a node serves TLS with."""
    _issue(config, name, "node", None, host)


@app.command("issue-gateway")
@friendly
def pki_issue_gateway(name: str, host: HostsOpt = None, config: ConfigOpt = None) -> None:
    """A certificate a gateway serves with and presents to its nodes."""
    _issue(config, name, "gateway", None, host)


@app.command("issue-client")
@friendly
def pki_issue_client(
    name: str,
    role: Annotated[str, typer.Option(help="the role it authenticates as: user | operator | admin")] = "user",
    config: ConfigOpt = None,
) -> None:
    """A client certificate (an operator's machine, a device) carrying a role."""
    from edgegen.security.keys import ROLES

    if role not in ROLES:
        raise EdgegenError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    _issue(config, name, "client", role, None)


@app.command("revoke")
@friendly
def pki_revoke(name: str, config: ConfigOpt = None) -> None:
    """Revoke a certificate: it goes into HOME/pki/crl.pem."""
    serial = _pki(config).revoke(name)
    err.print(f"revoked {name} (serial {serial:x}); crl.pem rewritten")
