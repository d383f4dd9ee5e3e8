"""The node's job workers: claim, run through the node's own routes, heartbeat, finish — live traffic first.

    workers = JobWorkers(queue, run, settings.jobs, live=lambda: middleware.inflight, name="node-a")
    await workers.start() … await workers.stop()

`run(job)` answers a job's request exactly as the live route would answer its submitter (status and
body): the node passes its routes behind the security gate, and the submitter's scope as it stands when
the job runs (node/jobs_api.py), so a job meets the same checks, batcher or scheduler as a live request.
Workers beyond `reserved` wait while live requests are in flight, so a burst of jobs never starves
interactive traffic; the reserved ones keep the queue moving. While a job runs, its lease is renewed every
third of `lease_s`; a renewal that fails (the job was cancelled, or the lease lost) stops the run. A 5xx or
429 answer, or an exception, is retried with back-off; any other answer finishes it.

An idle worker looks for work every `poll_s` at first, then, while it finds none, half as often each
time, down to once every `IDLE_MAX_S`: an idle node does not wake its event loop (and run a queue
transaction) forty times a second, which on an edge device costs power for nothing (1.6 % of a core
here). A job submitted to this node wakes its workers at once (`notify`); one that another node put in a
shared queue, or a retry whose back-off ends, waits at most `IDLE_MAX_S` more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from edgegen.config import JobsSettings
from edgegen.jobs.queue import Job, JobQueue, Status
from edgegen.observe import tracing

log = logging.getLogger("edgegen.jobs")
# A coroutine function, not any awaitable: each attempt runs as its own task (a lost lease cancels it).
Runner = Callable[[Job], Coroutine[Any, Any, tuple[int, bytes]]]
IDLE_MAX_S = 1.0  # the longest an idle worker waits between two looks at the queue


class JobObserver(Protocol):
    def on_job_run(self, outcome: str, seconds: float) -> None: ...

    # The workers of this process running a job now, at each change.
    def on_busy(self, busy: int) -> None: ...


class JobWorkers:
    def __init__(
        self,
        queue: JobQueue,
        run: Runner,
        settings: JobsSettings,
        live: Callable[[], int],
        name: str,
        observer: JobObserver | None = None,
    ) -> None:
        self.queue, self.run, self.settings, self.live, self.name = queue, run, settings, live, name
        self.observer = observer
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self.running = 0  # jobs in progress, for metrics

    def notify(self) -> None:
        """A job was just queued here: idle workers look now instead of at their next poll."""
        self._wake.set()

    async def _idle(self, quiet: int) -> bool:
        """Wait for a job's notice (True), or the poll interval after `quiet` looks that found nothing."""
        wait = min(self.settings.poll_s * 2 ** min(quiet, 20), max(IDLE_MAX_S, self.settings.poll_s))
        try:
            await asyncio.wait_for(self._wake.wait(), wait)
        except TimeoutError:
            return False
        finally:
            self._wake.clear()
        return True

    async def start(self) -> None:
        for index in range(self.settings.workers):
            reserved = index < self.settings.reserved
            task = asyncio.create_task(
                self._loop(f"{self.name}/{index}", reserved), name=f"job-worker-{index}"
            )
            self._tasks.append(task)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _loop(self, worker: str, reserved: bool) -> None:
        quiet = 0  # looks in a row that found nothing
        while True:
            try:
                if not reserved and self.live() > 0:
                    await asyncio.sleep(self.settings.poll_s)
                    continue
                job = await self.queue.claim(worker, self.settings.lease_s)
                if job is None:
                    quiet = 0 if await self._idle(quiet) else quiet + 1
                    continue
                quiet = 0
                await self._execute(job, worker)
            except asyncio.CancelledError:
                raise
            except Exception:  # a queue hiccup must not end the worker
                log.exception("job worker failed", extra={"worker": worker})
                await asyncio.sleep(1.0)

    async def _execute(self, job: Job, worker: str) -> None:
        started = time.perf_counter()
        outcome = await self._attempt(job, worker)
        if self.observer is not None:
            self.observer.on_job_run(outcome, time.perf_counter() - started)

    async def _attempt(self, job: Job, worker: str) -> str:
        """Run one attempt of `job` and record its outcome in the queue; return the outcome's name. The
        whole attempt is entered in the trace of the request that queued it: a `job.run` span (tracing
        on), and its trace id in every line said meanwhile, the route's and the outcome's alike."""
        if job.traceparent is None and tracing.tracer is None:
            return (await self._settle(job, worker))[0]
        traced = tracing.enter(job.traceparent, "job.run", {"edgegen.job": job.id}, job=True)
        status = 500
        try:
            outcome, status = await self._settle(job, worker)
            return outcome
        finally:
            if traced is not None:
                traced.close(None, status, {"edgegen.job_attempt": job.attempts})

    async def _settle(self, job: Job, worker: str) -> tuple[str, int]:
        """The attempt's outcome and the route's status (500 for an exception)."""
        self.running += 1
        self._busy()
        attempt = asyncio.create_task(self.run(job))
        keeper = asyncio.create_task(self._keep_lease(job.id, worker, attempt))
        try:
            status, body = await attempt
        except asyncio.CancelledError:
            if not keeper.done() or keeper.result() is not False:
                await self._give_back(job, worker)  # the node is stopping
                raise
            log.info("job stopped", extra={"job": job.id, "reason": "cancelled or its lease was lost"})
            return "stopped", 500
        except Exception as exc:
            return await self._retry(job, worker, f"{type(exc).__name__}: {exc}"), 500
        finally:
            keeper.cancel()
            self.running -= 1
            self._busy()
        if status >= 500 or status == 429:
            return await self._retry(job, worker, f"the route answered {status}"), status
        if not await self.queue.finish(job.id, worker, status, body):
            log.info("job result discarded", extra={"job": job.id, "reason": "cancelled or lease lost"})
            return "stopped", status
        return "finished", status

    def _busy(self) -> None:
        if self.observer is not None:
            self.observer.on_busy(self.running)

    async def _give_back(self, job: Job, worker: str) -> None:
        """The node stops before `job` ended: it goes back to the queue at once, this attempt not counted,
        for the next process or another node. Should that fail, its lease runs out and it is taken again
        then (an attempt spent, as after a crash)."""
        try:
            released = await self.queue.release(job.id, worker)
        except Exception:
            log.exception("job not given back; its lease will run out", extra={"job": job.id})
            return
        if released:
            log.info("job given back: the node stops", extra={"job": job.id})

    async def _retry(self, job: Job, worker: str, error: str) -> str:
        after = await self.queue.retry(job.id, worker, error)
        if after is None:
            reason = f"{error}; cancelled or its lease was lost"
            log.info("job stopped", extra={"job": job.id, "reason": reason})
            return "stopped"
        if after.status == Status.FAILED:
            log.warning("job failed", extra={"job": job.id, "reason": error, "attempts": after.attempts})
            return "failed"
        log.info("job retried", extra={"job": job.id, "reason": error, "attempts": after.attempts})
        return "retried"

    async def _keep_lease(self, job_id: str, worker: str, attempt: asyncio.Task[tuple[int, bytes]]) -> bool:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            if not await self.queue.heartbeat(job_id, worker, self.settings.lease_s):
                attempt.cancel()
                return False
