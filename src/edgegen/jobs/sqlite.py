"""The embedded job queue: SQLite in WAL mode — no server to start, one file, safe across SIGKILL.

Every change is one transaction (`BEGIN IMMEDIATE`: one writer at a time, across processes too), so a
crash leaves each job as it was before or after a step, never between. WAL with synchronous=NORMAL
survives a killed process (the OS keeps what was written); a power cut may lose the last commits.
Request and response bodies, and the submitter's principal, are encrypted at rest when a keyring is given
(security/atrest.py). A file made before principals were kept gains their column when opened; its jobs
hold none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgegen.db import connect, transaction
from edgegen.errors import Conflict
from edgegen.jobs.queue import FINAL, Job, JobRequest, Status, backoff, new_job_id, over_allowance
from edgegen.security.atrest import Keyring
from edgegen.security.auth import Principal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    method TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    lease_until REAL,
    worker TEXT,
    response_status INTEGER,
    response_body BLOB,
    error TEXT,
    idem TEXT,
    progress REAL NOT NULL DEFAULT 0,
    principal BLOB,
    traceparent TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (owner, idem) WHERE idem IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (priority DESC, created) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs (lease_until) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS jobs_final ON jobs (updated) WHERE status IN ('succeeded', 'failed', 'cancelled');
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (owner) WHERE status IN ('queued', 'running');
"""
_SELECT_ONE = (
    "SELECT id, owner, method, url, body, priority, status, attempts, created, updated, not_before,"
    " lease_until, worker, response_status, response_body, error, idem, progress, principal, traceparent"
    " FROM jobs WHERE id = ?"
)


class SqliteJobQueue:
    def __init__(
        self,
        path: Path,
        *,
        max_attempts: int = 3,
        backoff_s: float = 1.0,
        keyring: Keyring | None = None,
        clock: Callable[[], float] = time.time,
        max_queued: int = 1000,
        max_queued_bytes: int = 64 * 2**20,
    ) -> None:
        self._db = connect(path)
        self._db.executescript(_SCHEMA)
        # A file from before principals (or trace contexts) were kept gains their column; in one
        # transaction, as two processes (`--workers 2`) may open it at once.
        with transaction(self._db):
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "principal" not in columns:
                self._db.execute("ALTER TABLE jobs ADD COLUMN principal BLOB")
            if "traceparent" not in columns:
                self._db.execute("ALTER TABLE jobs ADD COLUMN traceparent TEXT")
        self.max_attempts, self.backoff_s, self.keyring, self.clock = max_attempts, backoff_s, keyring, clock
        self.max_queued, self.max_queued_bytes = max_queued, max_queued_bytes

    # -- encoding ---------------------------------------------------------------------------------
    def _seal(self, job_id: str, what: str, data: bytes) -> bytes:
        return self.keyring.encrypt(data, f"job/{job_id}/{what}".encode()) if self.keyring else data

    def _open(self, job_id: str, what: str, data: bytes | None) -> bytes | None:
        if data is None or self.keyring is None:
            return data
        return self.keyring.decrypt(data, f"job/{job_id}/{what}".encode())

    def _job(self, row: tuple[Any, ...]) -> Job:
        (job_id, owner, method, url, body, priority, status, attempts, created, updated, not_before,
         lease_until, worker, response_status, response_body, error, idem, progress,
         principal, traceparent) = row  # fmt: skip
        request = JobRequest(method, url, self._open(job_id, "request", body) or b"")
        record = self._open(job_id, "principal", principal)
        return Job(
            job_id, owner, request, priority, Status(status), attempts, created, updated, not_before,
            lease_until, worker, response_status, self._open(job_id, "response", response_body), error, idem,
            progress, Principal.from_record(record) if record is not None else None, traceparent,
        )  # fmt: skip

    def _row(self, job_id: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._db.execute(_SELECT_ONE, (job_id,)).fetchone()
        return row

    # -- the protocol ---------------------------------------------------------------------------------
    async def submit(
        self,
        owner: str,
        request: JobRequest,
        *,
        principal: Principal | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[Job, bool]:
        now = self.clock()
        with transaction(self._db):
            if idempotency_key is not None:
                found = self._db.execute(
                    "SELECT id FROM jobs WHERE owner = ? AND idem = ?", (owner, idempotency_key)
                ).fetchone()
                if found is not None:
                    job = self._job(self._row(found[0]))  # type: ignore[arg-type]
                    if job.request != request:
                        raise Conflict("this Idempotency-Key was used for another request")
                    return job, False
            job_id = new_job_id()
            body = self._seal(job_id, "request", request.body)
            jobs, size = self._db.execute(
                "SELECT count(*), coalesce(sum(length(body)), 0) FROM jobs"
                " WHERE owner = ? AND status IN ('queued', 'running')",
                (owner,),
            ).fetchone()
            refusal = over_allowance(owner, jobs, size + len(body), self.max_queued, self.max_queued_bytes)
            if refusal is not None:
                raise refusal
            sealed = self._seal(job_id, "principal", principal.to_record()) if principal is not None else None
            self._db.execute(
                "INSERT INTO jobs (id, owner, method, url, body, priority, status, created, updated, idem,"
                " principal, traceparent) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, owner, request.method, request.url, body, priority, now, now, idempotency_key,
                 sealed, traceparent),
            )  # fmt: skip
            return self._job(self._row(job_id)), True  # type: ignore[arg-type]

    async def get(self, job_id: str) -> Job | None:
        row = self._row(job_id)
        return self._job(row) if row is not None else None

    async def claim(self, worker: str, lease_s: float) -> Job | None:
        now = self.clock()
        with transaction(self._db):
            # Abandoned leases first: their workers died; those out of attempts end here, failed.
            self._db.execute(
                "UPDATE jobs SET status = 'failed', updated = ?, worker = NULL, lease_until = NULL,"
                " error = 'its worker stopped answering, ' || attempts || ' times'"
                " WHERE status = 'running' AND lease_until < ? AND attempts >= ?",
                (now, now, self.max_attempts),
            )
            # Two queries, each on its partial index (an OR of both would scan the table on every claim):
            # abandoned work first, then the waiting queue by priority and age.
            row = (
                self._db.execute(
                    "SELECT id FROM jobs WHERE status = 'running' AND lease_until < ?"
                    " ORDER BY lease_until LIMIT 1",
                    (now,),
                ).fetchone()
                or self._db.execute(
                    "SELECT id FROM jobs WHERE status = 'queued' AND not_before <= ?"
                    " ORDER BY priority DESC, created LIMIT 1",
                    (now,),
                ).fetchone()
            )
            if row is None:
                return None
            self._db.execute(
                "UPDATE jobs SET status = 'running', worker = ?, lease_until = ?, attempts = attempts + 1,"
                " updated = ? WHERE id = ?",
                (worker, now + lease_s, now, row[0]),
            )
            return self._job(self._row(row[0]))  # type: ignore[arg-type]

    async def heartbeat(
        self, job_id: str, worker: str, lease_s: float, progress: float | None = None
    ) -> bool:
        now = self.clock()
        with transaction(self._db):
            return bool(
                self._db.execute(
                    "UPDATE jobs SET lease_until = ?, updated = ?, progress = coalesce(?, progress)"
                    " WHERE id = ? AND worker = ? AND status = 'running'",
                    (now + lease_s, now, progress, job_id, worker),
                ).rowcount
            )

    async def finish(self, job_id: str, worker: str, status_code: int, body: bytes) -> bool:
        now = self.clock()
        status = Status.SUCCEEDED if status_code < 400 else Status.FAILED
        with transaction(self._db):
            return bool(
                self._db.execute(
                    "UPDATE jobs SET status = ?, response_status = ?, response_body = ?, updated = ?,"
                    " lease_until = NULL, progress = 1 WHERE id = ? AND worker = ? AND status = 'running'",
                    (status.value, status_code, self._seal(job_id, "response", body), now, job_id, worker),
                ).rowcount
            )

    async def release(self, job_id: str, worker: str) -> bool:
        now = self.clock()
        with transaction(self._db):
            return bool(
                self._db.execute(
                    "UPDATE jobs SET status = 'queued', worker = NULL, lease_until = NULL, not_before = ?,"
                    " attempts = attempts - 1, updated = ?"
                    " WHERE id = ? AND worker = ? AND status = 'running'",
                    (now, now, job_id, worker),
                ).rowcount
            )

    async def retry(self, job_id: str, worker: str, error: str) -> Job | None:
        now = self.clock()
        with transaction(self._db):
            row = self._row(job_id)
            if row is None:
                return None
            job = self._job(row)
            if job.worker != worker or job.status != Status.RUNNING:
                return None
            if job.attempts >= self.max_attempts:
                self._db.execute(
                    "UPDATE jobs SET status = 'failed', error = ?, updated = ?, lease_until = NULL"
                    " WHERE id = ?",
                    (error, now, job_id),
                )
            else:
                self._db.execute(
                    "UPDATE jobs SET status = 'queued', error = ?, updated = ?, lease_until = NULL,"
                    " worker = NULL, not_before = ? WHERE id = ?",
                    (error, now, now + backoff(job.attempts, self.backoff_s), job_id),
                )
            return self._job(self._row(job_id))  # type: ignore[arg-type]

    async def cancel(self, job_id: str) -> Job | None:
        now = self.clock()
        with transaction(self._db):
            self._db.execute(
                "UPDATE jobs SET status = 'cancelled', updated = ?, lease_until = NULL"
                " WHERE id = ? AND status IN ('queued', 'running')",
                (now, job_id),
            )
            row = self._row(job_id)
            return self._job(row) if row is not None else None

    async def purge(self, finished_before: float) -> int:
        finals = tuple(s.value for s in FINAL)
        with transaction(self._db):
            return int(
                self._db.execute(
                    "DELETE FROM jobs WHERE status IN (?, ?, ?) AND updated < ?", (*finals, finished_before)
                ).rowcount
            )

    async def counts(self) -> dict[str, int]:
        found = dict(self._db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
        return {s.value: int(found.get(s.value, 0)) for s in Status}

    async def close(self) -> None:
        self._db.close()
