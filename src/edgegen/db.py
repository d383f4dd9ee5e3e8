"""The way every edgegen store opens SQLite: WAL (readers never wait for the writer), synchronous=NORMAL
(a crash loses at most the last transactions, never the file), transactions taken explicitly.

    db = connect(path)
    with transaction(db):        # BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception
        db.execute(...)
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


def connect(path: Path, busy_ms: int = 30_000) -> sqlite3.Connection:
    """A connection in autocommit mode, usable from any one thread at a time; the file's directory is made
    (owner only) when missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One writer at a time, across processes too (`BEGIN IMMEDIATE`)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
