"""Ship a node's JSON log lines to its gateway, in order, through a spool on disk.

    node logging / access log ─▶ memory ─(every interval_s)─▶ spool (SQLite, seq) ─▶ POST /gateway/logs
                                                                 ▲ deleted once the gateway acknowledged

Every line gets a sequence number when it enters the spool (which has its own random id), and the
gateway keeps only numbers beyond the last it has from that spool, so a batch sent twice (its
acknowledgement lost) is stored once and the order per node is the spool's.
A gateway that cannot be reached leaves the lines in the spool: they go, oldest first, once it answers
again (retried with back-off up to 30 s). The spool is bounded (`spool_bytes`): beyond it the oldest
lines are dropped and the drop is logged. With several worker processes all write to one spool and
the one holding its lock file sends.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import ssl
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import orjson

from edgegen.db import connect, transaction
from edgegen.observe.logs import JsonFormatter

log = logging.getLogger("edgegen.logs")
MAX_BACKOFF_S = 30.0


class LogShipper:
    def __init__(
        self,
        url: str,
        node: str,
        spool: Path,
        *,
        headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
        interval_s: float = 1.0,
        batch: int = 1000,
        spool_bytes: int = 256 * 2**20,
    ) -> None:
        self.url = url.rstrip("/") + "/gateway/logs"
        self.node = node
        self.interval_s, self.batch, self.spool_bytes = interval_s, batch, spool_bytes
        self._db = connect(spool)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, line BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('spool', ?)", (uuid.uuid4().hex,))
        self.spool_id = self._db.execute("SELECT value FROM meta WHERE key = 'spool'").fetchone()[0]
        self._lock_path = spool.with_suffix(".lock")
        self._lock_file: IO[bytes] | None = None
        # The standard library's client: one POST a second needs no pool, and a node installs no other.
        self._headers = {**(headers or {}), "content-type": "application/json"}
        self._context = context
        self._pending: list[bytes] = []
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgegen-log-shipper", daemon=True)
        self._backoff = 0.0
        self.sent = self.dropped = 0

    # -- what the node calls ---------------------------------------------------------------------------------
    def add(self, lines: Iterable[bytes]) -> None:
        """Lines (JSON objects, no newline) to ship; cheap, from any thread."""
        with self._guard:
            self._pending.extend(lines)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Spool what is in memory and try once more to send; what is left waits for the next start."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()

    # -- the shipping thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval_s + self._backoff)
            try:
                self._spool()
                if self._leader():
                    self._send()
            except Exception:  # the shipper must outlive any one failure
                log.exception("log shipping failed")
            if stopping:
                return

    def _spool(self) -> None:
        with self._guard:
            lines, self._pending = self._pending, []
        if not lines:
            return
        with transaction(self._db) as db:
            db.executemany("INSERT INTO spool (line) VALUES (?)", ((line,) for line in lines))
            dropped = self._trim()
        if dropped:
            self.dropped += dropped
            log.warning("log spool full: oldest lines dropped", extra={"dropped": dropped})

    def _trim(self) -> int:
        """Drop the oldest lines down to 90 % of the bound, once past it; return how many went."""
        size = self._db.execute("SELECT COALESCE(SUM(LENGTH(line)), 0) FROM spool").fetchone()[0]
        if size <= self.spool_bytes:
            return 0
        excess, dropped, last = size - int(self.spool_bytes * 0.9), 0, None
        cursor = self._db.execute("SELECT seq, LENGTH(line) FROM spool ORDER BY seq")
        while excess > 0 and (rows := cursor.fetchmany(1000)):
            for seq, length in rows:
                excess, dropped, last = excess - length, dropped + 1, seq
                if excess <= 0:
                    break
        cursor.close()
        self._db.execute("DELETE FROM spool WHERE seq <= ?", (last,))
        return dropped

    def _leader(self) -> bool:
        """Whether this process sends (it holds the spool's lock file; another worker may)."""
        if self._lock_file is not None:
            return True
        handle = self._lock_path.open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def _send(self) -> None:
        while True:
            rows = self._db.execute(
                "SELECT seq, line FROM spool ORDER BY seq LIMIT ?", (self.batch,)
            ).fetchall()
            if not rows:
                self._backoff = 0.0
                return
            head = {"node": self.node, "spool": self.spool_id}
            body = orjson.dumps(head)[:-1] + b',"entries":['
            body += b",".join(b"[%d,%s]" % (seq, line) for seq, line in rows) + b"]}"
            # ship_to is a validated http(s) URL (config.Url): no other scheme reaches urlopen.
            request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")  # noqa: S310
            try:
                with urllib.request.urlopen(request, timeout=10, context=self._context) as response:  # noqa: S310  # nosec B310
                    status = response.status
            except urllib.error.HTTPError as exc:
                self._failed(f"the gateway answered {exc.code}: {exc.read()[:200].decode(errors='replace')}")
                return
            except OSError as exc:
                self._failed(f"{type(exc).__name__}: {exc}")
                return
            if status != 200:
                self._failed(f"the gateway answered {status}")
                return
            self._db.execute("DELETE FROM spool WHERE seq <= ?", (rows[-1][0],))
            self.sent += len(rows)
            self._backoff = 0.0
            if len(rows) < self.batch:
                return

    def _failed(self, reason: str) -> None:
        first = self._backoff == 0.0
        self._backoff = min(max(self._backoff * 2, self.interval_s), MAX_BACKOFF_S)
        if first:  # once per outage, not once per retry
            log.warning("logs not shipped; kept in the spool", extra={"reason": reason, "url": self.url})


class ShipHandler(logging.Handler):
    """The logging side: every record, as the JSON line stderr gets, to the shipper."""

    def __init__(self, shipper: LogShipper, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.shipper = shipper
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a log line that cannot be shipped must not fail the caller
            self.shipper.add([self.format(record).encode()])


def default_node_name(port: int) -> str:
    return f"{os.uname().nodename}:{port}"
