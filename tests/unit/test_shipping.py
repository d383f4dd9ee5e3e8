"""The node's log shipper on its own: a gateway that cannot be reached leaves the lines in the spool,
newest kept when the spool is full; one that answers gets them in order and they leave the spool."""

from __future__ import annotations

import http.server
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import orjson
import pytest

from edgegen.observe.shipping import LogShipper
from tests.e2e.node_process import free_port


class Gateway(http.server.BaseHTTPRequestHandler):
    batches: ClassVar[list[dict[str, object]]] = []
    fail_next = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if Gateway.fail_next:
            Gateway.fail_next -= 1
            self.send_response(503)
            self.end_headers()
            return
        Gateway.batches.append(orjson.loads(body))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"stored": 1}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    Gateway.batches, Gateway.fail_next = [], 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def wait(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_lines_go_in_order_through_failures(gateway: str, tmp_path: Path) -> None:
    Gateway.fail_next = 2  # the gateway answers 503 twice first
    shipper = LogShipper(gateway, "n1", tmp_path / "spool.sqlite", interval_s=0.02, batch=50)
    shipper.start()
    for i in range(120):
        shipper.add([orjson.dumps({"i": i})])
    wait(lambda: shipper.sent == 120)
    shipper.stop()
    entries = [entry for batch in Gateway.batches for entry in batch["entries"]]  # type: ignore[attr-defined]
    assert [line["i"] for _, line in entries] == list(range(120))
    assert [seq for seq, _ in entries] == sorted(seq for seq, _ in entries)
    assert {batch["node"] for batch in Gateway.batches} == {"n1"}
    assert len({batch["spool"] for batch in Gateway.batches}) == 1
    assert sqlite3.connect(tmp_path / "spool.sqlite").execute("SELECT COUNT(*) FROM spool").fetchone() == (0,)


def test_an_unreachable_gateway_keeps_the_newest_lines_within_the_bound(tmp_path: Path) -> None:
    shipper = LogShipper(f"http://127.0.0.1:{free_port()}", "n1", tmp_path / "spool.sqlite", interval_s=0.02,
                         spool_bytes=2**20)  # fmt: skip
    shipper.start()
    for i in range(3000):
        shipper.add([orjson.dumps({"i": i, "pad": "x" * 1000})])
    wait(lambda: shipper.dropped > 0)
    shipper.stop()
    db = sqlite3.connect(tmp_path / "spool.sqlite")
    assert db.execute("SELECT SUM(LENGTH(line)) FROM spool").fetchone()[0] <= 2**20
    kept = [orjson.loads(line)["i"] for (line,) in db.execute("SELECT line FROM spool ORDER BY seq")]
    assert kept == list(range(3000 - len(kept), 3000))  # the oldest went
    assert shipper.sent == 0
