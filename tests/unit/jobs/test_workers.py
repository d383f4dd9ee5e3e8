"""The worker pool against a real SQLite queue: what each answer does to a job, and what the pool reports."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
import pytest

from edgegen.config import JobsSettings
from edgegen.jobs.queue import Job, JobRequest, Status
from edgegen.jobs.sqlite import SqliteJobQueue
from edgegen.jobs.workers import JobWorkers, Runner
from edgegen.observe.logs import JsonFormatter

REQUEST = JobRequest("POST", "/predict", b'{"input_data": [1, 2, 3]}')
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_job_run(self, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        self.seen.append(outcome)

    def on_busy(self, busy: int) -> None:
        assert busy in (0, 1)  # one worker


async def run_until_final(answers: list[tuple[int, bytes]], tmp_path: Path) -> tuple[Status, list[str], int]:
    queue = SqliteJobQueue(tmp_path / "jobs.sqlite", max_attempts=3, backoff_s=0.01)
    job, _ = await queue.submit("acme", REQUEST)
    calls: list[str] = []

    async def run(claimed: Job) -> tuple[int, bytes]:
        assert (claimed.id, claimed.request, claimed.owner) == (job.id, REQUEST, "acme")
        calls.append(claimed.owner)
        return answers[min(len(calls), len(answers)) - 1]

    outcomes = Outcomes()
    return await until_final(queue, job, run, outcomes), outcomes.seen, len(calls)


async def until_final(
    queue: SqliteJobQueue, job: Job, run: Runner, observer: Outcomes | None = None
) -> Status:
    """One worker runs `job` with `run` until it succeeds or fails for good; the queue is closed then."""
    settings = JobsSettings(workers=1, reserved=1, poll_s=0.005, lease_s=5)
    workers = JobWorkers(queue, run, settings, live=lambda: 0, name="test", observer=observer)
    await workers.start()
    try:
        for _ in range(1000):
            current = await queue.get(job.id)
            assert current is not None
            if current.status in (Status.SUCCEEDED, Status.FAILED):
                return current.status
            await asyncio.sleep(0.005)
        raise AssertionError("the job never ended")
    finally:
        await workers.stop()
        await queue.close()


@pytest.mark.parametrize(
    ("answers", "status", "outcomes"),
    [
        ([(200, b"{}")], Status.SUCCEEDED, ["finished"]),
        ([(404, b"{}")], Status.FAILED, ["finished"]),  # at once, with the route's answer as its response
        ([(503, b""), (429, b""), (200, b"{}")], Status.SUCCEEDED, ["retried", "retried", "finished"]),
        ([(500, b"")], Status.FAILED, ["retried", "retried", "failed"]),
    ],
)
def test_each_answer_moves_the_job_and_is_reported(
    tmp_path: Path, answers: list[tuple[int, bytes]], status: Status, outcomes: list[str]
) -> None:
    final, seen, calls = asyncio.run(run_until_final(answers, tmp_path))
    assert final == status
    assert seen == outcomes
    assert calls == len(outcomes)


class CountingQueue(SqliteJobQueue):
    """A real SQLite queue that counts its workers' looks."""

    looks = 0

    async def claim(self, worker: str, lease_s: float) -> Job | None:
        self.looks += 1
        return await super().claim(worker, lease_s)


async def idle_then_submit(tmp_path: Path) -> tuple[int, float]:
    queue = CountingQueue(tmp_path / "jobs.sqlite", max_attempts=1, backoff_s=0.01)
    ran = asyncio.Event()

    async def run(claimed: Job) -> tuple[int, bytes]:
        ran.set()
        return 200, b"{}"

    settings = JobsSettings(workers=1, reserved=1, poll_s=0.01, lease_s=5)
    workers = JobWorkers(queue, run, settings, live=lambda: 0, name="test")
    await workers.start()
    try:
        await asyncio.sleep(1.5)  # at a fixed poll_s, 150 looks
        looks = queue.looks
        await queue.submit("acme", REQUEST)
        workers.notify()  # what the jobs route does after a submission
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(ran.wait(), 5)
        waited = asyncio.get_running_loop().time() - started
    finally:
        await workers.stop()
        await queue.close()
    return looks, waited


def test_an_idle_worker_looks_less_and_less_often_yet_a_notice_wakes_it(tmp_path: Path) -> None:
    looks, waited = asyncio.run(idle_then_submit(tmp_path))
    # 10, 20, 40 … ms, then once a second: 8 looks in 1.5 s (a little slack for a slow machine).
    assert 4 <= looks <= 12, looks
    assert waited < 0.5, waited


class Lines(logging.Handler):
    """Every record, as the node writes it (JSON with the request's and trace's ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(self.format(record)))


async def run_traced(answers: list[tuple[int, bytes] | Exception], tmp_path: Path) -> Status:
    queue = SqliteJobQueue(tmp_path / "jobs.sqlite", max_attempts=3, backoff_s=0.01)
    job, _ = await queue.submit("acme", REQUEST, traceparent=TRACEPARENT)
    calls = 0

    async def run(claimed: Job) -> tuple[int, bytes]:
        nonlocal calls
        calls += 1
        logging.getLogger("edgegen.node").info("route ran")
        answer = answers[calls - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return await until_final(queue, job, run)


@pytest.mark.parametrize(
    ("answers", "status", "said"),
    [
        ([RuntimeError("boom"), (503, b""), (200, b"{}")], Status.SUCCEEDED, ["job retried", "job retried"]),
        ([(500, b""), (500, b""), KeyError("k")], Status.FAILED, [*["job retried"] * 2, "job failed"]),
    ],
)
def test_every_line_of_a_jobs_attempts_carries_the_trace_of_the_request_that_queued_it(
    tmp_path: Path, answers: list[tuple[int, bytes] | Exception], status: Status, said: list[str]
) -> None:
    """What the route says while it runs, and what the worker says of each attempt's outcome (why it is
    retried, why it failed), are found by the trace id in the fleet's logs (tracing off: the trace id of
    the `traceparent` the job kept)."""
    lines = Lines()
    logger = logging.getLogger("edgegen")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert asyncio.run(run_traced(answers, tmp_path)) == status
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    ours = [line for line in lines.lines if line["logger"] in ("edgegen.jobs", "edgegen.node")]
    assert [line["msg"] for line in ours if line["logger"] == "edgegen.jobs"] == said
    assert len([line for line in ours if line["msg"] == "route ran"]) == len(answers)
    assert {line.get("trace_id") for line in ours} == {TRACE_ID}
    assert all("reason" in line for line in ours if line["logger"] == "edgegen.jobs")


def test_a_stop_gives_the_running_job_back_for_the_next_process(tmp_path: Path) -> None:
    """A graceful stop (SIGTERM, a restart, a software switch) while a job runs: the job goes back to the
    queue at once, its attempt not counted, and the next process finishes it. Before, it stayed `running`
    until its lease ran out (30 s by default), and each stop spent an attempt: a job on its last one
    failed with "its worker stopped answering" though nothing failed."""

    async def scenario() -> tuple[Status, int, float]:
        queue = SqliteJobQueue(tmp_path / "jobs.sqlite", max_attempts=2)
        job, _ = await queue.submit("acme", REQUEST)
        settings = JobsSettings(workers=1, reserved=1, poll_s=0.005, lease_s=30)
        running = asyncio.Event()

        async def slow(claimed: Job) -> tuple[int, bytes]:
            running.set()
            await asyncio.sleep(60)
            return 200, b"{}"

        for stop in range(3):  # more stops than attempts
            workers = JobWorkers(queue, slow, settings, live=lambda: 0, name=f"process-{stop}")
            await workers.start()
            await asyncio.wait_for(running.wait(), 10)
            running.clear()
            await workers.stop()
        began = asyncio.get_running_loop().time()
        status = await until_final(queue, job, lambda claimed: asyncio.sleep(0, (200, b"{}")))
        took = asyncio.get_running_loop().time() - began
        reopened = SqliteJobQueue(tmp_path / "jobs.sqlite", max_attempts=2)
        final = await reopened.get(job.id)
        await reopened.close()
        assert final is not None
        return status, final.attempts, took

    status, attempts, took = asyncio.run(scenario())
    assert (status, attempts) == (Status.SUCCEEDED, 1)
    assert took < 10  # at once, not after a lease of 30 s
