"""The JobQueue contract: every backend passes the same tests (a test clock drives leases and back-off)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from edgegen.errors import Conflict, Overloaded
from edgegen.jobs.queue import JobQueue, JobRequest, Status
from edgegen.jobs.redis import RedisJobQueue
from edgegen.jobs.sqlite import SqliteJobQueue
from edgegen.security.atrest import Keyring, new_key
from edgegen.security.auth import Principal

REQUEST = JobRequest("POST", "/predict", b'{"input_data": [1, 2, 3]}')
KEYED = Principal("key:ab12cd34", "user", ("digits", "digits-tflite"), "acme", key_id="ab12cd34")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


Factory = Callable[..., JobQueue]  # keyword arguments: the queue's allowance per owner


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Factory, Clock]:
    clock = Clock()
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = f"test:{uuid.uuid4().hex}:"  # each test its own queue in the one server

        def make(**limits: int) -> JobQueue:
            return RedisJobQueue(url, prefix=prefix, max_attempts=3, backoff_s=1.0, clock=clock, **limits)

    else:

        def make(**limits: int) -> JobQueue:
            path = tmp_path / "jobs.sqlite"
            return SqliteJobQueue(path, max_attempts=3, backoff_s=1.0, clock=clock, **limits)

    return make, clock


@pytest.fixture
async def queue(backend: tuple[Factory, Clock]) -> AsyncIterator[JobQueue]:
    made = backend[0]()
    yield made
    await made.close()


@pytest.fixture
def clock(backend: tuple[Factory, Clock]) -> Clock:
    return backend[1]


async def test_submit_get_and_count(queue: JobQueue) -> None:
    job, created = await queue.submit("acme", REQUEST, priority=2)
    assert created
    assert job.status == Status.QUEUED
    assert job.id.startswith("job_")
    assert (await queue.get(job.id)) == job
    assert await queue.get("job_" + "0" * 24) is None
    assert (await queue.counts())["queued"] == 1


async def test_a_job_keeps_its_submitters_principal(queue: JobQueue) -> None:
    keyed, _ = await queue.submit("acme", REQUEST, principal=KEYED)
    vouched = Principal("key:ab12cd34", "user", None, "beta")  # a gateway's word: no key of this node's
    other, _ = await queue.submit("beta", REQUEST, principal=vouched, priority=9)
    bare, _ = await queue.submit("acme", REQUEST)
    assert (keyed.principal, other.principal, bare.principal) == (KEYED, vouched, None)
    assert (await queue.get(keyed.id)).principal == KEYED  # type: ignore[union-attr]
    claimed = await queue.claim("w", 30)
    assert claimed is not None
    assert (claimed.id, claimed.principal) == (other.id, vouched)
    assert claimed.principal.key_id is None  # type: ignore[union-attr]


async def test_a_job_keeps_the_traceparent_of_the_request_that_queued_it(queue: JobQueue) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced, _ = await queue.submit("acme", REQUEST, traceparent=traceparent, priority=9)
    bare, _ = await queue.submit("acme", REQUEST)
    assert (traced.traceparent, bare.traceparent) == (traceparent, None)
    claimed = await queue.claim("w", 30)
    assert claimed is not None
    assert (claimed.id, claimed.traceparent) == (traced.id, traceparent)


async def test_idempotency_keys_are_per_owner_and_per_request(queue: JobQueue) -> None:
    first, _ = await queue.submit("acme", REQUEST, idempotency_key="k1")
    again, created = await queue.submit("acme", REQUEST, idempotency_key="k1")
    assert (again.id, created) == (first.id, False)
    other, created = await queue.submit("beta", REQUEST, idempotency_key="k1")
    assert created
    assert other.id != first.id
    with pytest.raises(Conflict):
        await queue.submit("acme", JobRequest("POST", "/predict", b"{}"), idempotency_key="k1")


async def test_claims_go_by_priority_then_age(queue: JobQueue, clock: Clock) -> None:
    ids = []
    for priority in (0, 5, 5, 1):
        ids.append((await queue.submit("acme", REQUEST, priority=priority))[0].id)
        clock.now += 1
    order = [(await queue.claim("w", 30)).id for _ in range(4)]  # type: ignore[union-attr]
    assert order == [ids[1], ids[2], ids[3], ids[0]]
    assert await queue.claim("w", 30) is None


async def test_a_dead_workers_job_is_claimed_again_and_finishes_once(queue: JobQueue, clock: Clock) -> None:
    job, _ = await queue.submit("acme", REQUEST)
    first = await queue.claim("a", 10)
    assert first is not None
    assert first.status == Status.RUNNING
    assert first.attempts == 1
    assert await queue.claim("b", 10) is None  # leased
    clock.now += 11  # a's lease expires: a died, or is too slow
    second = await queue.claim("b", 10)
    assert second is not None
    assert (second.id, second.worker, second.attempts) == (job.id, "b", 2)
    assert not await queue.heartbeat(job.id, "a", 10)
    assert not await queue.finish(job.id, "a", 200, b"from a")  # a lost its lease
    assert await queue.finish(job.id, "b", 200, b'{"prediction": [1]}')
    assert not await queue.finish(job.id, "b", 200, b"again")
    done = await queue.get(job.id)
    assert done is not None
    assert (done.status, done.response_status, done.response_body) == (
        Status.SUCCEEDED,
        200,
        b'{"prediction": [1]}',
    )


async def test_heartbeats_keep_the_lease(queue: JobQueue, clock: Clock) -> None:
    job, _ = await queue.submit("acme", REQUEST)
    await queue.claim("a", 10)
    for _ in range(5):
        clock.now += 8
        assert await queue.heartbeat(job.id, "a", 10, progress=0.5)
    assert await queue.claim("b", 10) is None
    current = await queue.get(job.id)
    assert current is not None
    assert current.progress == 0.5


async def test_a_job_given_back_is_taken_again_at_once_its_attempt_not_counted(
    queue: JobQueue, clock: Clock
) -> None:
    """A node stopping gracefully gives its running job back: the next worker takes it at once (not when
    the lease runs out), and no attempt was spent on it, so stops alone never fail a job. Only the lease
    holder may give it back."""
    job, _ = await queue.submit("acme", REQUEST)
    for stop in range(5):  # more stops than attempts
        claimed = await queue.claim(f"w{stop}", 30)
        assert claimed is not None
        assert claimed.attempts == 1
        assert not await queue.release(job.id, "someone-else")
        assert await queue.release(job.id, f"w{stop}")
        assert not await queue.release(job.id, f"w{stop}")  # not running any more
        current = await queue.get(job.id)
        assert current is not None
        assert (current.status, current.attempts, current.worker) == (Status.QUEUED, 0, None)
    assert (await queue.counts())["queued"] == 1
    claimed = await queue.claim("last", 30)
    assert claimed is not None
    assert await queue.finish(job.id, "last", 200, b"{}")


async def test_retries_back_off_then_fail(queue: JobQueue, clock: Clock) -> None:
    job, _ = await queue.submit("acme", REQUEST)
    for attempt in (1, 2):
        claimed = await queue.claim("w", 10)
        assert claimed is not None
        retried = await queue.retry(job.id, "w", f"overloaded {attempt}")
        assert retried is not None
        assert retried.status == Status.QUEUED
        assert await queue.claim("w", 10) is None  # backing off
        clock.now += 2.0**attempt  # 1 s, then 2 s
    await queue.claim("w", 10)
    dead = await queue.retry(job.id, "w", "overloaded 3")
    assert dead is not None
    assert (dead.status, dead.error, dead.attempts) == (Status.FAILED, "overloaded 3", 3)
    assert await queue.retry(job.id, "w", "again") is None


async def test_a_job_that_keeps_killing_its_workers_ends_failed(queue: JobQueue, clock: Clock) -> None:
    job, _ = await queue.submit("acme", REQUEST)
    for worker in ("a", "b", "c"):
        assert (await queue.claim(worker, 5)) is not None
        clock.now += 6
    assert await queue.claim("d", 5) is None
    dead = await queue.get(job.id)
    assert dead is not None
    assert dead.status == Status.FAILED
    assert "stopped answering" in (dead.error or "")


async def test_cancel_queued_and_running(queue: JobQueue) -> None:
    waiting, _ = await queue.submit("acme", REQUEST, priority=0)
    running, _ = await queue.submit("acme", REQUEST, priority=9)
    assert (await queue.claim("w", 30)).id == running.id  # type: ignore[union-attr]
    assert (await queue.cancel(waiting.id)).status == Status.CANCELLED  # type: ignore[union-attr]
    assert (await queue.cancel(running.id)).status == Status.CANCELLED  # type: ignore[union-attr]
    assert not await queue.heartbeat(running.id, "w", 30)  # the worker learns it should stop
    assert not await queue.finish(running.id, "w", 200, b"{}")
    assert await queue.claim("w", 30) is None
    assert await queue.cancel("job_" + "1" * 24) is None
    finished = await queue.cancel(running.id)
    assert finished is not None
    assert finished.status == Status.CANCELLED


async def test_a_client_error_is_a_failed_job_with_its_answer(queue: JobQueue) -> None:
    job, _ = await queue.submit("acme", REQUEST)
    await queue.claim("w", 30)
    assert await queue.finish(job.id, "w", 400, b'{"error": "bad input"}')
    done = await queue.get(job.id)
    assert done is not None
    assert (done.status, done.response_status) == (Status.FAILED, 400)


async def test_purge_drops_only_old_finished_jobs(queue: JobQueue, clock: Clock) -> None:
    old, _ = await queue.submit("acme", REQUEST)
    await queue.cancel(old.id)
    waiting, _ = await queue.submit("acme", REQUEST)
    clock.now += 100
    recent, _ = await queue.submit("acme", REQUEST)
    await queue.cancel(recent.id)
    assert await queue.purge(clock.now - 50) == 1
    assert await queue.get(old.id) is None
    assert await queue.get(waiting.id) is not None
    assert await queue.get(recent.id) is not None


# Two unfinished jobs per owner, or three times REQUEST's bytes.
LIMITS = {"max_queued": 2, "max_queued_bytes": 3 * len(REQUEST.body)}


@pytest.fixture
async def bounded(backend: tuple[Factory, Clock]) -> AsyncIterator[JobQueue]:
    made = backend[0](**LIMITS)
    yield made
    await made.close()


async def test_an_owner_may_have_only_so_many_unfinished_jobs(bounded: JobQueue, clock: Clock) -> None:
    first, _ = await bounded.submit("acme", REQUEST, priority=9)
    clock.now += 1
    second, _ = await bounded.submit("acme", REQUEST, idempotency_key="k")
    with pytest.raises(Overloaded, match="'acme' has 2 unfinished jobs"):
        await bounded.submit("acme", REQUEST)
    again, created = await bounded.submit("acme", REQUEST, idempotency_key="k")  # no new job
    assert (again.id, created) == (second.id, False)
    await bounded.submit("beta", REQUEST)  # another owner has its own allowance
    assert (await bounded.counts())["queued"] == 3  # the refused job is stored nowhere
    assert (await bounded.claim("w", 10)).id == first.id  # type: ignore[union-attr]
    with pytest.raises(Overloaded):
        await bounded.submit("acme", REQUEST)  # a running job counts
    assert await bounded.finish(first.id, "w", 200, b"{}")
    await bounded.submit("acme", REQUEST)  # a finished one does not
    await bounded.cancel(second.id)
    await bounded.submit("acme", REQUEST)  # nor a cancelled one
    with pytest.raises(Overloaded):
        await bounded.submit("acme", REQUEST)


async def test_a_failed_job_gives_its_share_back(bounded: JobQueue, clock: Clock) -> None:
    retried, _ = await bounded.submit("acme", REQUEST, priority=9)
    abandoned, _ = await bounded.submit("acme", REQUEST, priority=0)
    for attempt in (1, 2, 3):  # retried until out of attempts
        assert (await bounded.claim("w", 10)).id == retried.id  # type: ignore[union-attr]
        after = await bounded.retry(retried.id, "w", "overloaded")
        assert after is not None
        if attempt < 3:
            with pytest.raises(Overloaded):
                await bounded.submit("acme", REQUEST)  # a job backing off still counts
            clock.now += 10
    assert after.status == Status.FAILED
    filler, _ = await bounded.submit("acme", REQUEST)  # the failed job's share came back
    await bounded.cancel(filler.id)
    for _ in range(3):  # its worker dies on every attempt
        assert (await bounded.claim("w", 5)).id == abandoned.id  # type: ignore[union-attr]
        clock.now += 6
    assert await bounded.claim("w", 5) is None  # out of attempts: failed here
    assert (await bounded.get(abandoned.id)).status == Status.FAILED  # type: ignore[union-attr]
    await bounded.submit("acme", REQUEST)
    await bounded.submit("acme", REQUEST)


async def test_an_owner_may_queue_only_so_many_bytes(bounded: JobQueue) -> None:
    large = JobRequest("POST", "/predict", b" " * (2 * len(REQUEST.body)))
    await bounded.submit("acme", large)
    with pytest.raises(Overloaded, match="would hold"):
        await bounded.submit("acme", large)
    await bounded.submit("acme", REQUEST)  # exactly the allowance


async def test_jobs_survive_a_reopen(backend: tuple[Factory, Clock]) -> None:
    make, _ = backend
    first = make()
    job, _ = await first.submit("acme", REQUEST)
    await first.claim("w", 30)
    await first.close()
    again = make()
    try:
        found = await again.get(job.id)
        assert found is not None
        assert (found.status, found.worker, found.request) == (Status.RUNNING, "w", REQUEST)
    finally:
        await again.close()


def test_concurrent_workers_never_share_a_job(backend: tuple[Factory, Clock]) -> None:
    """Four connections claim at once until the queue is empty: each job is claimed exactly once."""
    make, _ = backend

    async def fill() -> None:
        queue = make()
        for _ in range(200):
            await queue.submit("acme", REQUEST)
        await queue.close()

    asyncio.run(fill())
    claimed: list[list[str]] = [[] for _ in range(4)]

    def work(index: int) -> None:
        async def run() -> None:
            queue = make()
            while (job := await queue.claim(f"w{index}", 60)) is not None:
                claimed[index].append(job.id)
                assert await queue.finish(job.id, f"w{index}", 200, b"{}")
            await queue.close()

        asyncio.run(run())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job for worker in claimed for job in worker]
    assert len(everything) == len(set(everything)) == 200


def test_sqlite_bodies_are_encrypted_at_rest(tmp_path: Path) -> None:
    async def run() -> bytes | None:
        queue = SqliteJobQueue(tmp_path / "jobs.sqlite", keyring=Keyring.parse(f"k1:{new_key()}"))
        job, _ = await queue.submit(
            "acme", JobRequest("POST", "/predict", b'{"input_data": "secret-payload"}'), principal=KEYED
        )
        await queue.claim("w", 30)
        await queue.finish(job.id, "w", 200, b'{"prediction": "secret-answer"}')
        found = await queue.get(job.id)
        await queue.close()
        assert found is not None
        assert found.principal == KEYED
        return found.response_body

    assert asyncio.run(run()) == b'{"prediction": "secret-answer"}'
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("jobs.sqlite*"))
    assert b"secret-payload" not in raw
    assert b"secret-answer" not in raw
    assert b"digits-tflite" not in raw  # the principal's scope, sealed like the bodies


# The jobs table as edgegen wrote it before principals were kept.
OLD_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, method TEXT NOT NULL, url TEXT NOT NULL, body BLOB NOT NULL,
    priority INTEGER NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL, not_before REAL NOT NULL DEFAULT 0, lease_until REAL,
    worker TEXT, response_status INTEGER, response_body BLOB, error TEXT, idem TEXT,
    progress REAL NOT NULL DEFAULT 0
);
"""


async def test_a_queue_file_from_before_principals_keeps_working(tmp_path: Path) -> None:
    path, old_id = tmp_path / "jobs.sqlite", "job_" + "a" * 24
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(OLD_SCHEMA)
        db.execute(
            "INSERT INTO jobs (id, owner, method, url, body, priority, status, created, updated)"
            " VALUES (?, 'acme', 'POST', '/predict', ?, 0, 'queued', 1, 1)",
            (old_id, REQUEST.body),
        )
    for _ in range(2):  # the column is added once; opening again finds it
        queue = SqliteJobQueue(path)
        try:
            old = await queue.get(old_id)
            assert old is not None
            assert (old.owner, old.request, old.status) == ("acme", REQUEST, Status.QUEUED)
            assert (old.principal, old.traceparent) == (None, None)
            new, _ = await queue.submit("acme", REQUEST, principal=KEYED)
            assert (await queue.get(new.id)).principal == KEYED  # type: ignore[union-attr]
        finally:
            await queue.close()
    queue = SqliteJobQueue(path)
    try:
        claimed = await queue.claim("w", 30)
        assert claimed is not None
        assert (claimed.id, claimed.principal) == (old_id, None)
        assert await queue.finish(old_id, "w", 403, b'{"error": "submit it again"}')
    finally:
        await queue.close()


async def test_redis_streams_hold_only_waiting_and_running_work(redis_url: str) -> None:
    queue = RedisJobQueue(redis_url, prefix=f"test:{uuid.uuid4().hex}:")
    try:
        ids = [(await queue.submit("acme", REQUEST, priority=p % 10))[0].id for p in range(30)]
        await queue.cancel(ids[0])
        while (job := await queue.claim("w", 30)) is not None:
            await queue.finish(job.id, "w", 200, b"{}")
        lengths = [await queue._redis.xlen(f"{queue.prefix}ready:{p}") for p in range(10)]
        assert lengths == [0] * 10
        assert (await queue.counts())["succeeded"] == 29
    finally:
        await queue.close()
