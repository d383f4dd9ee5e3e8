"""One fleet for the gateway's worker processes (`edgegen gateway --workers N`).

uvicorn's workers share the listening socket: the kernel hands each connection to one of them, and each
relays with its own connection pools and balancers. What must be one across them lives in a SQLite file
(WAL) in a directory the command made for this run (`SHARED_DIR`, which the workers inherit):

    nodes       the fleet in its order: URL, weight, draining, health verdict, ejection, last status
    rollbacks   the versions each model's last rollout replaced (POST /gateway/rollback without one)
    generation  moved by every change; each worker reads it every `sync_s` and reloads when it moved
    traffic     each worker's share of each node's recent traffic, written every `sync_s`
    history     the fleet view's traffic history, a point per node every `status_interval_s`
    alerts      the alerts the leader's analysis of the fleet's logs raised, active and recent

Decided once. One worker at a time holds `leader.lock` (flock: the kernel frees it when that worker
dies, and another takes it within `sync_s`) and runs the active health checks and the status reads; the
others take its verdicts from here. A passive ejection is decided by the worker that saw the failures
and written here, so every worker stops sending to that node. An admin change (a node added, removed,
drained, weighed) is written by the worker that took the request and reaches the others within `sync_s`;
a rollout or upgrade holds `changes.lock` for its whole run, so two never interleave whichever workers
take them.

Balancing stays per worker, on its own in-flight counts: no shared counter on the hot path. Each worker's
least-connections keeps its counts of any two nodes within one of each other when it picks, so with W
workers a node's total stays within about W of any other's (docs/benchmarks.md measures it). Prefix
affinity's ring is a function of the node names alone, the same in every worker, so a chat goes to the
same home whichever worker relays it; only the bounded-load spill-over reads the worker's own counts.

One fleet view. Each worker relays its own share of the traffic, so each tells the others, every
`sync_s`, what it saw of each node within the view's window: its rates, its requests in flight and its
latencies counted by bucket (fleet.py: `Share`). A worker's fleet view sums the rates and requests in
flight of all and takes p50 and p99 over their latencies merged, to within 2.2 %; what another worker
told is at most `sync_s` old, and a worker that has said nothing for `SHARE_STALE_S` (it died) is left
out. The leader samples that view into the history here, so `GET /gateway/fleet/history` gives the same
points whichever worker answers, and a new leader goes on with the same history.

One analysis. Nodes ship their lines to whichever worker their connection reached, into the one log
store; the leader reads every worker's access lines back from it and alone raises and resolves alerts,
which it keeps here for every worker's `GET /gateway/alerts` and `/metrics`. A worker that takes the lead
reads the store from the analysis' whole span back and takes the alerts as the last leader left them:
those active stay active, not raised a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

from edgegen.db import connect, transaction
from edgegen.errors import ConfigError
from edgegen.gateway.alerts import Board
from edgegen.gateway.fleet import MAX_HISTORY_POINTS, Fleet, FleetMember, Point, Share
from edgegen.gateway.settings import HealthSettings

SHARED_DIR = "EDGEGEN_GATEWAY_SHARED_DIR"  # set by `edgegen gateway --workers N` for its workers
LOCK_POLL_S = 0.05

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, url TEXT NOT NULL UNIQUE, position INTEGER NOT NULL, weight INTEGER NOT NULL,
    draining INTEGER NOT NULL, healthy INTEGER NOT NULL, ejections INTEGER NOT NULL,
    ejected_until REAL NOT NULL, last_seen REAL, status TEXT, status_error TEXT
);
CREATE TABLE IF NOT EXISTS rollbacks (model TEXT PRIMARY KEY, versions TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS traffic (
    worker TEXT NOT NULL, node TEXT NOT NULL, at REAL NOT NULL, share TEXT NOT NULL,
    PRIMARY KEY (worker, node)
);
CREATE TABLE IF NOT EXISTS history (node TEXT NOT NULL, at REAL NOT NULL, point TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_at ON history (at);
CREATE TABLE IF NOT EXISTS alerts (position INTEGER PRIMARY KEY, active INTEGER NOT NULL, view TEXT NOT NULL);
"""
SYNC_S = 0.5  # at most; half the health interval when that is shorter
SHARE_STALE_S = 5.0  # a worker's share of the traffic this much older than the last it told is left out
_COLUMNS = ("name", "url", "weight", "draining", "healthy", "ejections", "ejected_until", "last_seen",
            "status", "status_error")  # fmt: skip
_SELECT = (
    "SELECT name, url, weight, draining, healthy, ejections, ejected_until, last_seen, status, status_error"
    " FROM nodes ORDER BY position"
)


def shared_directory() -> Path | None:
    """The run's shared directory, in a worker of `--workers N`; None in a one-process gateway."""
    value = os.environ.get(SHARED_DIR)
    return Path(value) if value else None


def sync_interval(health: HealthSettings) -> float:
    """How often each worker tells its share of the traffic and takes the others' changes."""
    return min(SYNC_S, health.interval_s / 2)


class SharedFleet:
    """The fleet's shared state (a `FleetListener`): what this worker changes goes to the file at once;
    `sync` takes what the others changed."""

    def __init__(self, directory: Path, fleet: Fleet) -> None:
        self.directory = directory
        self.fleet = fleet
        self._db = connect(directory / "fleet.sqlite")
        self._db.executescript(_SCHEMA)
        # The views' reads (others' traffic, the history, the alerts) come from routes and scrapes that
        # run in a thread pool too: a connection of their own, one thread at a time.
        self._views = connect(directory / "fleet.sqlite")
        self._views_lock = threading.Lock()
        self._seen = -1
        self._leader: int | None = None
        self.worker = secrets.token_hex(6)  # (unique across the run's workers, restarted ones included)
        self.rollbacks = Rollbacks(self)
        with self._write():
            if self._db.execute("SELECT value FROM meta WHERE key = 'seeded'").fetchone() is None:
                # The first worker up writes the configured fleet; the others (and a worker restarted
                # later) take the fleet as it is now, admin changes included.
                for position, member in enumerate(fleet.nodes.values()):
                    self._upsert(member, position)
                self._db.execute("INSERT INTO meta VALUES ('seeded', 1)")
        fleet.listener = self
        fleet.others = self.others
        self.sync()

    # -- what this worker changed ------------------------------------------------------------------------
    def changed(self, member: FleetMember, *, new: bool = False) -> None:
        with self._write():
            if new:
                b = member.backend
                known = self._db.execute(
                    "SELECT name FROM nodes WHERE name = ? OR url = ?", (b.name, b.url)
                ).fetchone()
                if known is not None:
                    raise ConfigError(f"node {known[0]!r} has that name or URL already")
                position = self._db.execute("SELECT coalesce(max(position), -1) + 1 FROM nodes").fetchone()[0]
            else:
                found = self._db.execute(
                    "SELECT position FROM nodes WHERE name = ?", (member.backend.name,)
                ).fetchone()
                if found is None:
                    return  # removed by another worker meanwhile
                position = found[0]
            self._upsert(member, position)

    def removed(self, name: str) -> None:
        with self._write():
            self._db.execute("DELETE FROM nodes WHERE name = ?", (name,))

    def statuses(self, members: list[FleetMember], points: dict[str, Point]) -> None:
        """The leader's last status reads and checks, and the traffic history's new `points`, for every
        worker's fleet view; the history older than `history_s` goes (or beyond `MAX_HISTORY_POINTS`
        points a node, as a worker's own history holds)."""
        health = self.fleet.health
        kept_s = min(health.history_s, MAX_HISTORY_POINTS * health.status_interval_s)
        with self._write():
            for member in members:
                self._db.execute(
                    "UPDATE nodes SET last_seen = ?, status = ?, status_error = ? WHERE name = ?",
                    (member.last_seen, _json(member.status), member.status_error, member.backend.name),
                )
            rows = [(name, point[0], json.dumps(point)) for name, point in points.items()]
            self._db.executemany("INSERT INTO history VALUES (?, ?, ?)", rows)
            newest = max((point[0] for point in points.values()), default=0.0)
            self._db.execute("DELETE FROM history WHERE at <= ?", (newest - kept_s,))

    def history(self, since: float) -> dict[str, list[list[float | None]]]:
        """Each node's traffic history after `since` (wall time), oldest first, in the fleet's order."""
        # (a route's thread: the nodes copied in one step, as fleet.py's readers do)
        found: dict[str, list[list[float | None]]] = {name: [] for name in list(self.fleet.nodes)}
        query = "SELECT node, point FROM history WHERE at > ? ORDER BY at, rowid"
        for node, point in self._read(query, since):
            if node in found:
                found[node].append(json.loads(point))
        return found

    # -- one analysis ---------------------------------------------------------------------------------------
    def keep_alerts(self, board: Board) -> None:
        """The leader's alerts, for every worker (the generation stays: it is no change of the fleet)."""
        active, recent = board
        rows = [(1, json.dumps(view)) for view in active] + [(0, json.dumps(view)) for view in recent]
        with transaction(self._db):
            self._db.execute("DELETE FROM alerts")
            self._db.executemany("INSERT INTO alerts (active, view) VALUES (?, ?)", rows)

    def alerts(self) -> Board:
        """The alerts as the leader kept them: active, and recent (newest first)."""
        board: Board = ([], [])
        for active, view in self._read("SELECT active, view FROM alerts ORDER BY position"):
            board[0 if active else 1].append(json.loads(view))
        return board

    # -- one fleet view -----------------------------------------------------------------------------------
    def publish(self) -> None:
        """This worker's share of each node's traffic, for the others' views (the generation stays: it
        is no change of the fleet). Shares of workers silent for `SHARE_STALE_S` go."""
        now = self.fleet.clock()
        rows = [(self.worker, name, now, json.dumps(m.share(now))) for name, m in self.fleet.nodes.items()]
        with transaction(self._db):
            self._db.execute(
                "DELETE FROM traffic WHERE worker = ? OR at < ?", (self.worker, now - SHARE_STALE_S)
            )
            self._db.executemany("INSERT INTO traffic VALUES (?, ?, ?, ?)", rows)

    def others(self) -> dict[str, list[Share]]:
        """What the other workers last told of each node's traffic (`Fleet.others`)."""
        found: dict[str, list[Share]] = {}
        query = "SELECT node, share FROM traffic WHERE worker != ? AND at >= ?"
        for node, share in self._read(query, self.worker, self.fleet.clock() - SHARE_STALE_S):
            found.setdefault(node, []).append(json.loads(share))
        return found

    def _read(self, query: str, *args: object) -> list[Any]:
        with self._views_lock:
            return self._views.execute(query, args).fetchall()

    def _upsert(self, member: FleetMember, position: int) -> None:
        b = member.backend
        self._db.execute(
            "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (b.name, b.url, position, b.weight, int(member.draining), int(member.healthy), member.ejections,
             member.ejected_until, member.last_seen, _json(member.status), member.status_error),
        )  # fmt: skip

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One transaction that moves the generation; this worker's own write is not reloaded."""
        with transaction(self._db):
            row = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            generation = row[0] if row is not None else 0
            yield
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (generation + 1,))
        if generation == self._seen:
            self._seen = generation + 1

    # -- what the others changed -----------------------------------------------------------------------
    def sync(self) -> list[FleetMember]:
        """Reload the fleet when another worker changed it; gives the members that left."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        generation = row[0] if row is not None else 0
        if generation == self._seen:
            return []
        self._db.execute("BEGIN")
        try:
            generation = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
            rows = self._db.execute(_SELECT).fetchall()
        finally:
            self._db.execute("COMMIT")
        self._seen = generation
        members = [dict(zip(_COLUMNS, r, strict=True)) for r in rows]
        for member in members:
            member["status"] = json.loads(member["status"]) if member["status"] is not None else None
        return self.fleet.apply(members)

    # -- one worker decides -------------------------------------------------------------------------------
    def lead(self) -> bool:
        """Whether this worker leads now: it takes the lock when nobody holds it, and keeps it for life."""
        if self._leader is not None:
            return True
        fd = os.open(self.directory / "leader.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._leader = fd
        return True

    def changes_lock(self) -> FleetLock:
        return FleetLock(self.directory / "changes.lock")

    def close(self) -> None:
        if self._leader is not None:
            os.close(self._leader)
            self._leader = None
        self._db.close()
        self._views.close()

    # -- rollbacks -------------------------------------------------------------------------------------------
    def _rollback_get(self, model: str) -> dict[str, str | None] | None:
        row = self._db.execute("SELECT versions FROM rollbacks WHERE model = ?", (model,)).fetchone()
        return json.loads(row[0]) if row is not None else None

    def _rollback_set(self, model: str, versions: dict[str, str | None] | None) -> None:
        with self._write():
            if versions is None:
                self._db.execute("DELETE FROM rollbacks WHERE model = ?", (model,))
            else:
                row = (model, json.dumps(versions))
                self._db.execute("INSERT OR REPLACE INTO rollbacks VALUES (?, ?)", row)

    def _rollback_models(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT model FROM rollbacks ORDER BY model")]


class FleetLock:
    """The lock of fleet changes (rollouts, upgrades): one at a time in this worker (asyncio) and across
    workers (flock on `path`, polled: a rollout waits seconds, not microseconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = asyncio.Lock()
        self._fd: int | None = None

    async def __aenter__(self) -> None:
        await self._local.acquire()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(LOCK_POLL_S)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        except BaseException:
            self._local.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (closing the descriptor releases the flock)
            self._fd = None
        self._local.release()


class Rollbacks(MutableMapping[str, dict[str, str | None]]):
    """`Rollouts.before` (model → node → the version it served before), kept in the shared file."""

    def __init__(self, shared: SharedFleet) -> None:
        self._shared = shared

    def __getitem__(self, model: str) -> dict[str, str | None]:
        versions = self._shared._rollback_get(model)
        if versions is None:
            raise KeyError(model)
        return versions

    def __setitem__(self, model: str, versions: dict[str, str | None]) -> None:
        self._shared._rollback_set(model, versions)

    def __delitem__(self, model: str) -> None:
        if self._shared._rollback_get(model) is None:
            raise KeyError(model)
        self._shared._rollback_set(model, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shared._rollback_models())

    def __len__(self) -> int:
        return len(self._shared._rollback_models())


def _json(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None
