"""JSON logs: a client breaking TLS is the client's error, not a server error line."""

from __future__ import annotations

import json
import logging

import pytest

from edgegen.observe.logs import configure_logging


def test_client_tls_failures_are_info_and_server_errors_stay_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info")
    try:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")
    except RuntimeError:
        logging.getLogger("asyncio").error("Fatal error on SSL protocol\nprotocol: x", exc_info=True)
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["level"], line["msg"].splitlines()[0]) for line in lines] == [
        ("info", "Fatal error on SSL protocol"),
        ("error", "Task exception was never retrieved"),
    ]
    assert "exc" not in lines[0]
    configure_logging("warning")
    logging.getLogger("asyncio").error("SSL handshake failed")
    assert capsys.readouterr().err == ""
