"""The audit log keeps every event, refuses edits, shows tampering, and never stores a secret."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgegen.security.audit import AuditLog


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.sqlite")


def test_events_are_kept_in_order_and_chain(audit: AuditLog) -> None:
    first = audit.record("key:ab12cd34", "model.activate", "digits@3", "ok", {"from": "2"})
    audit.record("cert:ops", "node.drain", "n1", "ok")
    audit.record("10.0.0.9", "auth.failure", "/v1/chat/completions", "refused", {"reason": "bad key"})
    entries = audit.tail()
    assert [e.action for e in entries] == ["model.activate", "node.drain", "auth.failure"]
    assert entries[0].id == first
    assert entries[0].detail == {"from": "2"}
    assert audit.verify() is None
    assert [e.action for e in audit.tail(1)] == ["auth.failure"]


def test_the_log_refuses_edits(audit: AuditLog, tmp_path: Path) -> None:
    audit.record("a", "x", "t", "ok")
    db = sqlite3.connect(tmp_path / "audit.sqlite")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET outcome = 'refused'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")


def test_rewriting_history_shows(audit: AuditLog, tmp_path: Path) -> None:
    for i in range(4):
        audit.record("a", f"action-{i}", "t", "ok")
    db = sqlite3.connect(tmp_path / "audit.sqlite", isolation_level=None)
    db.execute("DROP TRIGGER audit_no_update")  # someone with the file can do this; the chain still tells
    db.execute("UPDATE audit SET outcome = 'refused' WHERE id = 2")
    assert audit.verify() == 2


def test_secrets_never_reach_the_log(audit: AuditLog, tmp_path: Path) -> None:
    audit.record(
        "key:ab12cd34",
        "key.create",
        "k2",
        "ok",
        {
            "token": "eg_12345678_s3cr3t",
            "nested": {"Authorization": "Bearer x", "api_key": "y"},
            "role": "user",
        },
    )
    assert audit.tail()[0].detail == {
        "token": "[redacted]",
        "nested": {"Authorization": "[redacted]", "api_key": "[redacted]"},
        "role": "user",
    }
    assert b"s3cr3t" not in (tmp_path / "audit.sqlite").read_bytes()
