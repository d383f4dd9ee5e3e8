"""Jobs: requests to run later, kept safe across crashes. One small protocol, two backends.

    queue = SqliteJobQueue(home / "jobs" / "jobs.sqlite")       # or RedisJobQueue(url) (jobs/redis.py)
    job, created = await queue.submit("acme", JobRequest("POST", "/predict", body), principal=principal,
                                      priority=5, idempotency_key="order-17")
    job = await queue.claim("node-a/worker-1", lease_s=30)        # highest priority, then oldest
    await queue.heartbeat(job.id, "node-a/worker-1", lease_s=30)  # False: cancelled, or the lease was lost
    await queue.finish(job.id, "node-a/worker-1", 200, answer)    # True once per job, whoever ran it
    await queue.retry(job.id, "node-a/worker-1", "overloaded")    # back-off, or failed after max_attempts

Life of a job: queued → running (leased to one worker until `lease_until`) → succeeded | failed, or
cancelled from queued or running. A lease that expires (its worker died) makes the job claimable again;
every claim counts an attempt, and a job that used up `max_attempts` — retried or abandoned — ends failed
(the dead-letter state, its last error kept). `finish` and `retry` are accepted only from the worker that
holds the lease, so a job finishes once even when a slow worker and its successor both ran it.
Idempotency keys are per owner: the same key gives back the same job (409 if the request differs).
A job keeps its submitter's principal (encrypted at rest like its bodies); the node decides again, from
it, what the job may do when it runs (node/jobs_api.py). A job stored without one (queued by an older edgegen)
reads None. A job keeps the `traceparent` of the request that queued it too (observe/tracing.py): its
runs are spans of that request's trace, and their log lines carry its trace id.

Each owner (a tenant, else a credential) may have at most `max_queued` unfinished jobs (queued or running)
whose request bodies hold at most `max_queued_bytes` bytes as stored; `submit` beyond either bound raises
`Overloaded` (429 on /v1/jobs) and stores nothing, so one tenant cannot grow the queue without end. The
check and the insert are one atomic step in both backends.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from edgegen.errors import Overloaded
from edgegen.security.auth import Principal


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
JOB_ID = re.compile(r"^job_[0-9a-f]{24}$")


def new_job_id() -> str:
    return f"job_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class JobRequest:
    method: str
    url: str
    body: bytes  # JSON, as the live route would receive it


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    request: JobRequest
    priority: int
    status: Status
    attempts: int
    created: float
    updated: float
    not_before: float = 0.0
    lease_until: float | None = None
    worker: str | None = None
    response_status: int | None = None
    response_body: bytes | None = None
    error: str | None = None
    idempotency_key: str | None = None
    progress: float = 0.0
    principal: Principal | None = None  # who submitted it, as checked then
    traceparent: str | None = None  # the W3C trace context of the request that queued it


# A full allowance frees up as the tenant's jobs run: worth a look again after a few seconds.
RETRY_AFTER_S = 5


def over_allowance(
    owner: str, jobs: int, size: int, max_queued: int, max_queued_bytes: int
) -> Overloaded | None:
    """Why `owner` may not queue one more job — `jobs`: its unfinished jobs now; `size`: their bytes
    together with the new one's — or None when the new job fits its allowance.

    >>> over_allowance("acme", 2, 10, 3, 100) is None
    True
    >>> over_allowance("acme", 3, 10, 3, 100).message
    "tenant 'acme' has 3 unfinished jobs, the most it may have; retry once some have run"
    """
    if jobs >= max_queued:
        return Overloaded(
            f"tenant {owner!r} has {jobs} unfinished jobs, the most it may have; retry once some have run",
            RETRY_AFTER_S,
        )
    if size > max_queued_bytes:
        return Overloaded(
            f"tenant {owner!r}'s unfinished jobs would hold {size} bytes, over its {max_queued_bytes}; "
            "retry once some have run",
            RETRY_AFTER_S,
        )
    return None


def backoff(attempts: int, base_s: float, cap_s: float = 300.0) -> float:
    """Seconds before a job that failed `attempts` times may run again: base, 2·base, 4·base … capped.

    >>> [backoff(n, 1.0) for n in (1, 2, 3)]
    [1.0, 2.0, 4.0]
    """
    return float(min(cap_s, base_s * 2 ** (attempts - 1)))


class JobQueue(Protocol):
    max_attempts: int

    async def submit(
        self,
        owner: str,
        request: JobRequest,
        *,
        principal: Principal | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[Job, bool]: ...

    async def get(self, job_id: str) -> Job | None: ...

    async def claim(self, worker: str, lease_s: float) -> Job | None: ...

    async def heartbeat(
        self, job_id: str, worker: str, lease_s: float, progress: float | None = None
    ) -> bool: ...

    async def finish(self, job_id: str, worker: str, status_code: int, body: bytes) -> bool: ...

    async def retry(self, job_id: str, worker: str, error: str) -> Job | None: ...

    # Back in the queue at once, the attempt not counted: its worker stops (a graceful stop of the node,
    # a restart, a software switch) before the job ended. False when `worker` no longer holds it.
    async def release(self, job_id: str, worker: str) -> bool: ...

    async def cancel(self, job_id: str) -> Job | None: ...

    async def purge(self, finished_before: float) -> int: ...

    async def counts(self) -> dict[str, int]: ...

    async def close(self) -> None: ...
