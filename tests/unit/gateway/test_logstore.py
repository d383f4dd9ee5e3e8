"""The gateway's store of the fleet's logs: kept once, in order, searchable, bounded in time."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edgegen.errors import InvalidInput
from edgegen.gateway.logstore import LogStore, Query, parse_ts


def line(i: int, **fields: Any) -> dict[str, Any]:
    ts = f"2026-11-27T12:00:{i:02d}.250Z"
    return {"ts": ts, "level": "info", "logger": "edgegen.access", "msg": "request", **fields}


@pytest.fixture
def store(tmp_path: Path) -> LogStore:
    return LogStore(tmp_path / "logs" / "fleet.sqlite")


def test_timestamps() -> None:
    assert parse_ts("2026-11-27T12:00:01.250Z") == pytest.approx(1795780801.25)
    assert parse_ts("2026-11-27T12:00:01Z") == 1795780801.0
    for bad in (None, 17, "yesterday", "2026-11-27T12:00:01.250", "2026-13-27T12:00:01.250Z"):
        assert parse_ts(bad) is None


def test_a_batch_sent_twice_is_kept_once_and_order_holds(store: LogStore) -> None:
    batch = [[i, line(i, request_id=f"r{i}")] for i in range(1, 6)]
    assert len(store.add("n1", "spoolA", batch)) == 5
    assert store.add("n1", "spoolA", batch[2:]) == []  # its acknowledgement was lost: resent
    assert len(store.add("n1", "spoolA", [*batch[3:], [6, line(6)]])) == 1
    assert len(store.add("n1", "spoolB", batch)) == 5  # a new spool numbers from 1 again
    assert len(store.add("n2", "spoolA", batch)) == 5
    got = store.query(Query(node="n1", limit=100))
    assert [g["seq"] for g in got] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert [g["time"] for g in got] == sorted(g["time"] for g in got)


def test_filters_and_text_search(store: LogStore) -> None:
    failed = {**line(2), "level": "error", "msg": "model failed"}
    store.add("n1", "a", [[1, line(1, request_id="abc")], [2, failed], [3, {**line(3), "level": "warning"}]])
    store.add("n2", "a", [[1, {**line(4), "msg": "model loaded", "model": "digits"}]])
    assert [g["seq"] for g in store.query(Query(level="warning"))] == [2, 3]
    assert [g["seq"] for g in store.query(Query(request_id="abc"))] == [1]
    assert [g["node"] for g in store.query(Query(text="model"))] == ["n1", "n2"]
    assert store.query(Query(text="model failed"))[0]["level"] == "error"
    assert store.query(Query(text="failed model")) == []  # a phrase, in order
    assert len(store.query(Query(since=parse_ts(line(2)["ts"]), until=parse_ts(line(4)["ts"])))) == 2
    assert [g["seq"] for g in store.query(Query(node="n1", limit=2))] == [2, 3]  # the newest, oldest first
    for hostile in ('"', "NEAR(a b)", "msg:*", "') OR 1=1 --", "a AND", "*"):
        assert isinstance(store.query(Query(text=hostile)), list)  # FTS syntax never reaches the engine
    with pytest.raises(InvalidInput):
        store.query(Query(text="a\x00b"))
    with pytest.raises(InvalidInput):
        store.query(Query(level="loud"))
    with pytest.raises(InvalidInput):
        store.query(Query(limit=0))


def test_a_trace_is_found_by_its_id_across_nodes(store: LogStore) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    store.add("gateway", "a", [[1, line(1, request_id="r1", trace_id=trace)], [2, line(2, request_id="r2")]])
    store.add("n1", "a", [[1, line(3, request_id="r1", trace_id=trace)], [2, line(4, trace_id=17)]])
    store.add("n2", "a", [[1, line(5, request_id="job", trace_id=trace)]])  # a job it queued, run later
    assert [(g["node"], g["request_id"]) for g in store.query(Query(trace_id=trace))] == [
        ("gateway", "r1"),
        ("n1", "r1"),
        ("n2", "job"),
    ]
    assert store.query(Query(trace_id="0" * 32)) == []


def test_a_file_from_before_trace_ids_is_opened_and_searched(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(
            "CREATE TABLE logs (id INTEGER PRIMARY KEY, node TEXT NOT NULL, spool TEXT NOT NULL,"
            " seq INTEGER NOT NULL, ts REAL NOT NULL, level TEXT NOT NULL, logger TEXT NOT NULL,"
            " request_id TEXT, line TEXT NOT NULL, UNIQUE (node, spool, seq));"
            "INSERT INTO logs (node, spool, seq, ts, level, logger, request_id, line)"
            " VALUES ('n1', 'a', 1, 1.0, 'info', 'edgegen.access', 'old', '{\"msg\": \"before\"}');"
        )
    store = LogStore(path)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    store.add("n1", "a", [[2, line(2, request_id="new", trace_id=trace)]])
    assert [g["request_id"] for g in store.query(Query(trace_id=trace))] == ["new"]
    assert [g["seq"] for g in store.query(Query(node="n1"))] == [1, 2]
    store.close()


@pytest.mark.parametrize(
    "entries",
    [[["1", line(1)]], [[1]], [[1, "not an object"]], [[True, line(1)]], ["x"], [[1.5, line(1)]]],
)
def test_malformed_entries_are_refused_whole(store: LogStore, entries: list[Any]) -> None:
    with pytest.raises(InvalidInput):
        store.add("n1", "a", [[0, line(0)], *entries])
    assert store.query(Query()) == []


def test_purge_drops_old_lines_and_their_text(store: LogStore) -> None:
    store.add("n1", "a", [[i, {**line(i), "msg": f"word{i}"}] for i in range(10)])
    assert store.purge(parse_ts(line(5)["ts"]) or 0) == 5
    assert [g["seq"] for g in store.query(Query())] == [5, 6, 7, 8, 9]
    assert store.query(Query(text="word1")) == []


def test_the_analysis_reads_every_line_stored_after_a_purge_emptied_the_store(store: LogStore) -> None:
    """Line ids only grow: a store purged empty (a fleet quiet for longer than the retention) or of its
    newest line (one spooled late, with an old time) never hands out an id the analysis read past."""
    store.add("n1", "a", [[i, line(i)] for i in range(3)])
    _, cursor = store.access_since(-1)
    store.purge(parse_ts(line(59)["ts"]) or 0)  # everything is older
    store.add("n1", "a", [[3, line(3)], [4, line(4)]])
    assert [g["time"] for g in store.access_since(cursor)[0]] == [parse_ts(line(i)["ts"]) for i in (3, 4)]
    store.add("n2", "b", [[0, line(50)], [1, line(1)]])  # the newest id carries the oldest time
    _, cursor = store.access_since(-1)
    store.purge(parse_ts(line(2)["ts"]) or 0)
    store.add("n2", "b", [[2, line(51)]])
    assert [g["node"] for g in store.access_since(cursor)[0]] == ["n2"]
