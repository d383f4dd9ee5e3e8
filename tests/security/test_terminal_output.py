"""Finding 9: text that came from elsewhere cannot drive the operator's terminal.

A path anyone may request ends up, through a node's access log, in the gateway's log store; `edgegen
logs query` printed it raw, so ESC sequences recoloured or cleared the screen and a CR/LF forged lines
that looked like the tool's own. The CLI now shows every control character as a visible escape, and
rich markup in remote text stays text; the store keeps what was sent."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgegen.terminal import printable, shown
from tests.conftest import fill_store
from tests.e2e.node_process import GatewayProcess, NodeProcess, free_port, running

FORGED = "FORGED error: the fleet is down"
# Clear the screen, set the window title, then a new line that reads like the tool's own.
HOSTILE_PATH = "/x%1b%5b2J%1b%5d0;pwned%07%0d%0a" + FORGED.replace(" ", "%20")


@pytest.fixture(scope="module")
def shipping(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[tuple[NodeProcess, GatewayProcess]]:
    home = tmp_path_factory.mktemp("node")
    fill_store(home / "models", model_files)
    gateway_port = free_port()
    env = {
        "EDGEGEN_LOGS__SHIP_TO": f"http://127.0.0.1:{gateway_port}",
        "EDGEGEN_LOGS__NODE": "n0",
        "EDGEGEN_LOGS__INTERVAL_S": "0.1",
        "EDGEGEN_SECURITY__BAN_AFTER_FAILURES": "100000",
    }
    node = NodeProcess(home, env=env)
    root = tmp_path_factory.mktemp("gateway")
    config = root / "gateway.toml"
    config.write_text(f'[[nodes]]\nurl = "{node.url}"\nname = "n0"\n[health]\ninterval_s = 0.2\n')
    gateway = GatewayProcess(root, "--config", str(config), port=gateway_port)
    with running(node), running(gateway):
        yield node, gateway


def _query(gateway: GatewayProcess, *args: str) -> str:
    command = [sys.executable, "-m", "edgegen", "logs", "query", "--gateway", gateway.url, *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def _stored(gateway: GatewayProcess, logger: str, **params: str) -> list[dict[str, object]]:
    """The stored lines of `logger` that match `params`, once the first has been shipped.

    A request's lines are shipped in batches, so lines of other loggers may arrive before the one sought."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = httpx.get(f"{gateway.url}/gateway/logs", params={**params, "limit": 1000}).json()["lines"]
        if found := [line for line in lines if line["logger"] == logger]:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no stored {logger} line for {params}")


def test_a_requested_path_cannot_drive_the_terminal(shipping: tuple[NodeProcess, GatewayProcess]) -> None:
    node, gateway = shipping
    httpx.get(f"{node.url}{HOSTILE_PATH}", headers={"X-Request-Id": "hostile-path"})
    [line] = _stored(gateway, "edgegen.access", request_id="hostile-path")
    assert "\x1b[2J\x1b]0;pwned\x07\r\n" + FORGED in str(line["path"])  # kept as it was sent
    printed = _query(gateway, "--request-id", "hostile-path")
    assert not {"\x1b", "\x07", "\r"} & set(printed)
    assert not any(row.startswith("FORGED") for row in printed.splitlines())  # no forged line
    assert "\\x1b[2J\\x1b]0;pwned\\x07\\r\\n" + FORGED in printed  # shown, visibly escaped
    assert "\\u001b" in _query(gateway, "--request-id", "hostile-path", "--json")  # JSON escapes them too


def test_a_shipped_message_cannot_plant_links_or_reorder_text(
    shipping: tuple[NodeProcess, GatewayProcess],
) -> None:
    _, gateway = shipping
    message = "click [link=http://evil.example]here[/link] \u202eevil\u202c \x1b]8;;http://e.example\x1b\\x"
    entry = [1, {"level": "info", "logger": "evil", "msg": message}]
    batch = {"node": "n9", "spool": "abc1", "entries": [entry]}
    assert httpx.post(f"{gateway.url}/gateway/logs", json=batch).status_code == 200
    _stored(gateway, "evil", node="n9")
    printed = _query(gateway, "--node", "n9")
    assert not {"\x1b", "\u202e"} & set(printed)
    assert "[link=http://evil.example]here[/link]" in printed  # markup printed as text
    assert "\\u202eevil\\u202c" in printed


@pytest.mark.parametrize(
    ("raw", "seen"),
    [
        ("plain text", "plain text"),
        ("a\x1b[31mred", "a\\x1b[31mred"),
        ("line\r\nforged", "line\\r\\nforged"),
        ("\x9b2J", "\\x9b2J"),  # C1 CSI: one byte on some terminals
        ("\u2028next", "\\u2028next"),
        ("tab\there", "tab\\there"),
        ("naïve 日本", "naïve 日本"),  # printable text stays as it is
    ],
)
def test_printable_escapes_every_control_character(raw: str, seen: str) -> None:
    assert printable(raw) == seen


def test_shown_keeps_markup_as_text() -> None:
    assert shown("[red]x[/red]\x1b") == "\\[red]x\\[/red]\\x1b"
