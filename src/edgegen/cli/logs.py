"""`edgegen logs`: the fleet's logs, as the nodes shipped them to the gateway."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from edgegen.cli.options import GATEWAY_URL, CaOpt, GatewayUrlOpt, KeyOpt, friendly, out
from edgegen.errors import EdgegenError
from edgegen.gateway.client import GatewayClient
from edgegen.terminal import printable

app = typer.Typer(no_args_is_help=True, help="The fleet's logs, kept by the gateway.")


@app.command("query")
@friendly
def logs_query(
    gateway_url: GatewayUrlOpt = GATEWAY_URL,
    key: KeyOpt = None,
    ca: CaOpt = None,
    node: Annotated[str | None, typer.Option(help="one node's lines")] = None,
    level: Annotated[str | None, typer.Option(help="this level and above: debug|info|warning|error")] = None,
    since: Annotated[str | None, typer.Option(help="from: 30s, 10m, 2h, 1d ago, or epoch seconds")] = None,
    until: Annotated[str | None, typer.Option(help="until: as --since")] = None,
    request_id: Annotated[str | None, typer.Option("--request-id", help="one request's lines")] = None,
    trace_id: Annotated[
        str | None,
        typer.Option("--trace-id", help="one trace's lines (32 hex digits)"),
    ] = None,
    text: Annotated[str | None, typer.Option(help="lines holding this phrase (full-text search)")] = None,
    limit: Annotated[int, typer.Option(help="at most this many, the newest")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False,
) -> None:
    """The fleet's logs, as the nodes shipped them to the gateway, oldest first."""
    window = {"since": _since(since), "until": _since(until)}
    answer = GatewayClient(gateway_url, key, ca).get(
        "/gateway/logs",
        node=node,
        level=level,
        request_id=request_id,
        trace_id=trace_id,
        text=text,
        limit=limit,
        **window,
    )
    for line in answer["lines"]:
        if as_json:
            out.print(json.dumps(line), markup=False, highlight=False, soft_wrap=True)
            continue
        rest = {
            k: v for k, v in line.items() if k not in ("node", "seq", "time", "ts", "level", "logger", "msg")
        }
        # Every part came from a node (or from whoever reached one): shown with its control characters
        # escaped, so no line can drive the terminal or pass for another; the store keeps them as sent.
        fields = " ".join(f"{k}={v}" for k, v in rest.items())
        head = f"{line.get('ts', '')} {line['node']} {line.get('level', ''):7} {line.get('logger', '')}:"
        text = printable(f"{head} {line.get('msg', '')} {fields}")
        out.print(text, markup=False, highlight=False, soft_wrap=True)


def _since(value: str | None) -> float | None:
    """`10m`, `2h`, `1d`, `30s` ago, or seconds since the epoch, as seconds since the epoch."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if value[-1:] in units:
            return time.time() - float(value[:-1]) * units[value[-1]]
        return float(value)
    except ValueError:
        raise EdgegenError(
            f"{value!r} is not a time: give 30s, 10m, 2h, 1d, or seconds since the epoch"
        ) from None
