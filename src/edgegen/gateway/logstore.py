"""The fleet's logs at the gateway: every node's JSON lines, in one SQLite file with full-text search.

    POST /gateway/logs   {"node": "n1", "spool": "…", "entries": [[seq, {line}], …]} from a node's shipper
    GET  /gateway/logs   ?node=&level=&since=&until=&request_id=&trace_id=&text=&limit=   (oldest first)

(node, spool, seq) is unique — `spool` names the node's spool file, so a node whose spool was made
anew starts its numbers again without colliding — and a node sends in order, so lines numbered beyond
the last kept are the new ones: a batch sent twice is kept once. Lines sort by their time, then node and
sequence. A request's lines are found by its request id (the gateway forwards its own, so one id
finds both hops), a trace's by its W3C trace id (observe/tracing.py: every request a client made in
one trace, each with its own request id). Text search is FTS5 over the whole line, phrase-matched.
Lines older than `retention_s` are dropped every minute. The gateway's own records join them
(`OwnLines`, node `gateway`).
"""

from __future__ import annotations

import calendar
import contextlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edgegen.db import connect, transaction
from edgegen.errors import InvalidInput
from edgegen.observe.logs import JsonFormatter

SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    spool TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    level TEXT NOT NULL,
    logger TEXT NOT NULL,
    request_id TEXT,
    trace_id TEXT,
    line TEXT NOT NULL,
    UNIQUE (node, spool, seq)
);
CREATE INDEX IF NOT EXISTS logs_ts ON logs (ts);
CREATE INDEX IF NOT EXISTS logs_request ON logs (request_id) WHERE request_id IS NOT NULL;
CREATE VIRTUAL TABLE IF NOT EXISTS logs_text USING fts5 (line, content='logs', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS logs_text_add AFTER INSERT ON logs BEGIN
    INSERT INTO logs_text (rowid, line) VALUES (new.id, new.line);
END;
CREATE TRIGGER IF NOT EXISTS logs_text_drop AFTER DELETE ON logs BEGIN
    INSERT INTO logs_text (logs_text, rowid, line) VALUES ('delete', old.id, old.line);
END;
"""
# After the columns a file made before them gains (`LogStore.__init__`).
INDEXES = "CREATE INDEX IF NOT EXISTS logs_trace ON logs (trace_id) WHERE trace_id IS NOT NULL;"
LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_LIMIT = 10_000


def parse_ts(value: object) -> float | None:
    """Our lines' `ts` (`2026-11-27T12:00:00.123Z`) as seconds since the epoch."""
    if not isinstance(value, str) or len(value) < 20 or not value.endswith("Z"):
        return None
    try:
        whole = calendar.timegm(time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S"))
        return whole + float("0" + value[19:-1]) if value[19] == "." else float(whole)
    except ValueError:
        return None


@dataclass(frozen=True)
class Query:
    node: str | None = None
    level: str | None = None  # this level and above
    since: float | None = None
    until: float | None = None
    request_id: str | None = None
    text: str | None = None
    limit: int = 100
    trace_id: str | None = None


class LogStore:
    def __init__(self, path: Path) -> None:
        self._db = connect(path)
        self._db.executescript(SCHEMA)
        if "trace_id" not in {row[1] for row in self._db.execute("PRAGMA table_info(logs)")}:
            self._db.execute("ALTER TABLE logs ADD COLUMN trace_id TEXT")  # a file from before traces
        self._db.executescript(INDEXES)

    def add(self, node: str, spool: str, entries: list[Any]) -> list[dict[str, Any]]:
        """Keep a node's batch; return the lines that were new (for the analysis), with node and time."""
        last = self._db.execute(
            "SELECT MAX(seq) FROM logs WHERE node = ? AND spool = ?", (node, spool)
        ).fetchone()[0]
        rows, lines = [], []
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int):
                raise InvalidInput("each entry must be [sequence number, log line object]")
            seq, line = entry
            if not isinstance(line, dict):
                raise InvalidInput("each log line must be a JSON object")
            if last is not None and seq <= last:
                continue  # sent before; its acknowledgement was lost
            ts = parse_ts(line.get("ts")) or time.time()
            level = str(line.get("level", "info")).lower()
            request_id, trace_id = line.get("request_id"), line.get("trace_id")
            ids = [value if isinstance(value, str) else None for value in (request_id, trace_id)]
            text = orjson.dumps(line).decode()
            rows.append((node, spool, seq, ts, level, str(line.get("logger", "")), *ids, text))
            lines.append({**line, "node": node, "time": ts})
        with transaction(self._db) as db:
            db.executemany(
                "INSERT OR IGNORE INTO logs (node, spool, seq, ts, level, logger, request_id, trace_id, line)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return lines

    def query(self, q: Query) -> list[dict[str, Any]]:
        where: list[str] = []
        args: list[str | float] = []
        if q.node is not None:
            where.append("logs.node = ?")
            args.append(q.node)
        if q.level is not None:
            if q.level not in LEVELS:
                raise InvalidInput(f"level must be one of {', '.join(LEVELS)}")
            wanted = LEVELS[LEVELS.index(q.level) :]
            where.append(f"logs.level IN ({','.join('?' * len(wanted))})")
            args += wanted
        if q.since is not None:
            where.append("logs.ts >= ?")
            args.append(q.since)
        if q.until is not None:
            where.append("logs.ts < ?")
            args.append(q.until)
        if q.request_id is not None:
            where.append("logs.request_id = ?")
            args.append(q.request_id)
        if q.trace_id is not None:
            where.append("logs.trace_id = ?")
            args.append(q.trace_id)
        source = "logs"
        if q.text and "\x00" in q.text:
            raise InvalidInput("text must not hold a NUL character")
        if q.text:
            source = "logs JOIN logs_text ON logs_text.rowid = logs.id"
            where.append("logs_text MATCH ?")
            args.append('"' + q.text.replace('"', '""') + '"')  # one phrase: FTS syntax never leaks in
        if not 1 <= q.limit <= MAX_LIMIT:
            raise InvalidInput(f"limit must be 1 to {MAX_LIMIT}")
        sql = (
            f"SELECT logs.node, logs.seq, logs.ts, logs.line FROM {source}"  # noqa: S608 (fixed fragments)  # nosec B608
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY logs.ts DESC, logs.node DESC, logs.seq DESC LIMIT ?"
        )
        rows = self._db.execute(sql, [*args, q.limit]).fetchall()
        return [{**orjson.loads(line), "node": n, "seq": s, "time": ts} for n, s, ts, line in reversed(rows)]

    def access_since(self, after: int, limit: int = MAX_LIMIT) -> tuple[list[dict[str, Any]], int]:
        """The access lines kept after line `after` (an id; oldest first, at most `limit`) as the alert
        analysis reads them — node, time, logger, status, ms, model —, and the id to read on from.
        `after` -1: from the first line kept, however old."""
        rows = self._db.execute(
            "SELECT id, node, ts, json_extract(line, '$.status'), json_extract(line, '$.ms'),"
            " json_extract(line, '$.model') FROM logs WHERE id > ? AND logger = 'edgegen.access'"
            " ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()
        lines = [
            {"node": node, "time": ts, "logger": "edgegen.access", "status": status, "ms": ms, "model": model}
            for _, node, ts, status, ms, model in rows
        ]
        return lines, rows[-1][0] if rows else after

    def last_before(self, ts: float) -> int:
        """The id of the last line kept before the first of time `ts` or later (-1: none)."""
        found = self._db.execute("SELECT min(id) FROM logs WHERE ts >= ?", (ts,)).fetchone()[0]
        if found is None:
            return int(self._db.execute("SELECT coalesce(max(id), -1) FROM logs").fetchone()[0])
        return int(found) - 1

    def purge(self, before: float) -> int:
        """Drop the lines of before `before`, but for the newest line, whatever its time: ids are rowids,
        which SQLite hands out again once the highest is gone — below where the analysis read to
        (`access_since`), whose next lines it would then never see."""
        return self._db.execute(
            "DELETE FROM logs WHERE ts < ? AND id < (SELECT max(id) FROM logs)", (before,)
        ).rowcount

    def close(self) -> None:
        self._db.close()


class OwnLines(logging.Handler):
    """The gateway's own log records, as the JSON lines its stderr gets, waiting for its store: the
    fleet's logs include what the gateway itself said (rollouts, restarts, nodes going down)."""

    def __init__(self, node: str, level: int, max_pending: int = 10_000) -> None:
        super().__init__(level)
        self.node = node  # the name its lines are kept under
        self.setFormatter(JsonFormatter())
        self.pending: deque[str] = deque(maxlen=max_pending)  # a store that falls behind loses the oldest
        self.spool = secrets.token_hex(8)  # this process's sequence; the store keeps (node, spool, seq) once
        self.seq = 0

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a line that cannot be kept must not fail the caller
            self.pending.append(self.format(record))

    def take(self) -> list[Any]:
        """What waits, as store entries: [sequence number, line object]. A record about a node (its
        `node` field) names it `fleet_node`: `node` is who said the line, here the gateway."""
        entries = []
        while self.pending:
            self.seq += 1
            line = orjson.loads(self.pending.popleft())
            if "node" in line:
                line["fleet_node"] = line.pop("node")
            entries.append([self.seq, line])
        return entries
