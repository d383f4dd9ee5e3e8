"""What every command group shares, declared once: the options, the consoles, the error wrapper, and
the node's settings a command reads its flags into.

A command's function is its whole interface, in typer's manner: its parameters are the options, typed
`Annotated[...]` aliases from here when more than one group takes them, so `--config` or `--gateway`
says the same thing and reads the same `EDGEGEN_*` variable wherever it appears.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from edgegen.config import Settings, load_settings
from edgegen.errors import EdgegenError
from edgegen.terminal import shown

out = Console()
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="allow listening beyond loopback without TLS and auth")
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML settings file", envvar="EDGEGEN_CONFIG")
]
StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="model store directory", envvar="EDGEGEN_STORE")
]
GatewayUrlOpt = Annotated[
    str, typer.Option("--gateway", help="the gateway's URL", envvar="EDGEGEN_GATEWAY_URL")
]
KeyOpt = Annotated[str | None, typer.Option(help="an operator key", envvar="EDGEGEN_KEY")]
AdminKeyOpt = Annotated[str | None, typer.Option(help="an admin key", envvar="EDGEGEN_KEY")]
CaOpt = Annotated[Path | None, typer.Option(help="CA file for an https:// gateway")]
WheelArg = Annotated[Path, typer.Argument(help="an edgegen wheel", exists=True, dir_okay=False)]
GATEWAY_URL = "http://127.0.0.1:8080"  # the default of every --gateway


def friendly(func: F) -> F:
    """Turn an edgegen error into one line on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EdgegenError as exc:
            err.print(f"[red]error:[/red] {shown(exc.message)}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def node_settings(config: Path | None, **flags: object) -> Settings:
    """The node's settings, as `--config` and the other flags change them. Flags become their
    EDGEGEN_* twins, so worker processes read the same settings."""
    for name, value in flags.items():
        if value is not None:
            os.environ[f"EDGEGEN_{name.upper()}"] = str(value)
    if config is not None:
        os.environ["EDGEGEN_CONFIG"] = str(config)
    return load_settings()
