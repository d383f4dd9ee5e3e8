"""The disk tier: one SQLite file (WAL), bounded in bytes, shared by a node's worker processes.

Each write is one transaction, so a process killed mid-write leaves the entry absent or whole, never
torn. Values are sealed with the node's keyring when it has one (AES-GCM, the entry's key as
associated data, so a value moved to another row fails to open); entries sealed with a key the keyring
no longer holds, or stored in plaintext before encryption was switched on, are dropped at open.
Least recently used entries go first once the file holds more than its bound (expired ones before
them). Reads run on the caller's thread with their own connection; writes belong on one writer thread.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from edgegen.cache.memory import Entry, Removed
from edgegen.db import connect, transaction
from edgegen.errors import IntegrityError
from edgegen.security.atrest import Keyring

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key BLOB PRIMARY KEY,
    model TEXT NOT NULL,
    tag TEXT NOT NULL,
    stored REAL NOT NULL,
    expires REAL NOT NULL,
    used REAL NOT NULL,
    size INTEGER NOT NULL,
    key_id TEXT,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_used ON entries (used);
CREATE INDEX IF NOT EXISTS entries_model ON entries (model, tag);
CREATE INDEX IF NOT EXISTS entries_expires ON entries (expires);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 1), bytes INTEGER NOT NULL,
                                   entries INTEGER NOT NULL);
"""
ROW_OVERHEAD = 100  # bytes a row costs beside its key and value (columns, index entries)
LOW_WATER = 0.9  # eviction goes down to this share of the bound, so it does not run on every write


class DiskTier:
    def __init__(
        self,
        path: Path,
        max_bytes: int,
        keyring: Keyring | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # cached answers are the tenants' data
        self.max_bytes = max_bytes
        self._keyring = keyring
        self._clock = clock
        self._writer = connect(path, 10_000)
        self._writer.executescript(SCHEMA)
        self._drop_unreadable()
        self._reader = connect(path, 200)
        # The file's (bytes, entries) as of the last write committed here, set in one assignment once it
        # is: the writer thread counts as it writes, and another thread (the node's status route) reads
        # both at once. The file keeps them (`totals`), written in each write's transaction, so that the
        # bound holds for the file whichever of a node's worker processes writes.
        with transaction(self._writer) as db:
            self.usage = self._recount(db)

    @staticmethod
    def _recount(db: sqlite3.Connection) -> tuple[int, int]:
        """Bytes and entries counted afresh, and kept as the file's totals."""
        count, total = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        db.execute("INSERT OR REPLACE INTO totals (id, bytes, entries) VALUES (1, ?, ?)", (total, count))
        return int(total), int(count)

    def _drop_unreadable(self) -> None:
        if self._keyring is None:
            dropped = self._writer.execute("DELETE FROM entries WHERE key_id IS NOT NULL").rowcount
        else:
            ids = sorted(self._keyring.ids)
            marks = ",".join("?" * len(ids))
            dropped = self._writer.execute(
                f"DELETE FROM entries WHERE key_id IS NULL OR key_id NOT IN ({marks})",  # noqa: S608 (marks only)  # nosec B608
                ids,
            ).rowcount
        if dropped:
            log.info("cached answers dropped: sealed with another key", extra={"count": dropped})

    def get(self, key: bytes) -> Entry | None:
        """The entry under `key` if it is there, unexpired and opens; call `touch` on a hit."""
        row = self._reader.execute(
            "SELECT model, tag, stored, expires, key_id, value FROM entries WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        model, tag, stored, expires, key_id, value = row
        if expires <= self._clock():
            return None
        if key_id is not None:
            if self._keyring is None:
                return None
            try:
                value = self._keyring.decrypt(value, b"cache/" + key)
            except IntegrityError as exc:
                log.warning("a cached answer did not open; it is ignored", extra={"reason": exc.message})
                return None
        return Entry(value, model, tag, stored, expires)

    def touch(self, key: bytes) -> None:
        self._writer.execute("UPDATE entries SET used = ? WHERE key = ?", (self._clock(), key))

    def put(self, key: bytes, entry: Entry, removed: Removed) -> None:
        value, key_id = entry.value, None
        if self._keyring is not None:
            value, key_id = self._keyring.encrypt(value, b"cache/" + key), self._keyring.active
        size = len(value) + len(key) + ROW_OVERHEAD
        if size > self.max_bytes:
            return
        with transaction(self._writer) as db:
            old = db.execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO entries (key, model, tag, stored, expires, used, size, key_id, value)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    entry.model,
                    entry.tag,
                    entry.stored,
                    entry.expires,
                    self._clock(),
                    size,
                    key_id,
                    value,
                ),
            )
            db.execute(
                "UPDATE totals SET bytes = bytes + ?, entries = entries + ?",
                (size - (old[0] if old else 0), 0 if old else 1),
            )
            total, count = db.execute("SELECT bytes, entries FROM totals").fetchone()
            if total > self.max_bytes:
                total, count = self._evict(db, removed)
        self.usage = (total, count)

    def _evict(self, db: sqlite3.Connection, removed: Removed) -> tuple[int, int]:
        """Expired entries first; if not enough, the least recently used down to the low-water mark.
        Returns the bytes and entries left."""
        removed.expired += db.execute("DELETE FROM entries WHERE expires <= ?", (self._clock(),)).rowcount
        total, count = self._recount(db)
        if total <= self.max_bytes:
            return total, count
        goal = int(self.max_bytes * LOW_WATER)
        while total > goal:
            victims = db.execute("SELECT key, size FROM entries ORDER BY used LIMIT 64").fetchall()
            if not victims:
                break
            for key, size in victims:
                db.execute("DELETE FROM entries WHERE key = ?", (key,))
                total -= size
                count -= 1
                removed.size += 1
                if total <= goal:
                    break
        db.execute("UPDATE totals SET bytes = ?, entries = ?", (total, count))
        return total, count

    def invalidate(self, model: str, keep_tag: str | None, removed: Removed) -> None:
        with transaction(self._writer) as db:
            gone = db.execute(
                "DELETE FROM entries WHERE model = ? AND tag IS NOT ?", (model, keep_tag)
            ).rowcount
            removed.invalidated += gone
            usage = self._recount(db)
        self.usage = usage

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
