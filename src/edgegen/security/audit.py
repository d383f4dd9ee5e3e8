"""The audit log: every admin action and security event, append-only, tamper-evident (SQLite).

    audit = AuditLog(home / "security" / "audit.sqlite")
    audit.record("key:ab12cd34", "model.activate", "digits@3", "ok", {"from": "2"})
    audit.verify()        # None, or the id of the first row that does not chain

Each row stores the SHA-256 of (the previous row's hash, its own fields), so rewriting history means
rewriting every later hash; triggers refuse UPDATE and DELETE outright. Fields named like secrets
(token, secret, password, authorization, key material) are redacted before they are written.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SECRET = re.compile(r"(token|secret|password|passwd|authorization|api_?key|private)", re.IGNORECASE)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    hash BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


@dataclass(frozen=True)
class Entry:
    id: int
    ts: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]


def redact(detail: dict[str, Any]) -> dict[str, Any]:
    """The detail with every secret-looking field replaced, at any depth."""
    out: dict[str, Any] = {}
    for key, value in detail.items():
        if _SECRET.search(key):
            out[key] = "[redacted]"
        elif isinstance(value, dict):
            out[key] = redact(value)
        else:
            out[key] = value
    return out


def _chain(
    previous: bytes, ts: float, actor: str, action: str, target: str, outcome: str, detail: str
) -> bytes:
    fields = json.dumps([ts, actor, action, target, outcome, detail], separators=(",", ":")).encode()
    return hashlib.sha256(previous + fields).digest()


class AuditLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # WAL: a record costs tens of microseconds, not an fsync, and several processes may append.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def record(
        self, actor: str, action: str, target: str, outcome: str, detail: dict[str, Any] | None = None
    ) -> int:
        text = json.dumps(redact(detail or {}), sort_keys=True, default=str)
        ts = time.time()
        self._db.execute("BEGIN IMMEDIATE")  # the previous hash and this row, atomically
        try:
            row = self._db.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
            digest = _chain(row[0] if row else b"", ts, actor, action, target, outcome, text)
            cursor = self._db.execute(
                "INSERT INTO audit (ts, actor, action, target, outcome, detail, hash) VALUES (?,?,?,?,?,?,?)",
                (ts, actor, action, target, outcome, text, digest),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return int(cursor.lastrowid or 0)

    def verify(self) -> int | None:
        """The id of the first row whose hash does not follow from the rows before it, or None."""
        previous = b""
        for row in self._db.execute(
            "SELECT id, ts, actor, action, target, outcome, detail, hash FROM audit ORDER BY id"
        ):
            if _chain(previous, *row[1:7]) != row[7]:
                return int(row[0])
            previous = row[7]
        return None

    def tail(self, n: int = 50) -> list[Entry]:
        rows = self._db.execute(
            "SELECT id, ts, actor, action, target, outcome, detail FROM audit ORDER BY id DESC LIMIT ?", (n,)
        ).fetchall()
        return [Entry(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in reversed(rows)]
