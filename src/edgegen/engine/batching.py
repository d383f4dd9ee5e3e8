"""Dynamic batching for fixed-shape models, in the manner of Triton's dynamic batcher.

Requests wait in one bounded queue per model. A worker takes the first waiting request, then keeps
taking more until the batch holds `max_batch_size` rows or `max_queue_delay_us` has passed since it
took the first; the batch runs as one forward pass in a worker thread and its output is split back.
While one batch runs, the next fills up by itself, so under load batches grow without any delay.

A forward pass normally runs in a worker thread (ONNX Runtime and LiteRT release the GIL, so the event
loop goes on parsing requests meanwhile). Handing a batch to a thread and back costs about 100 µs,
more than a small model's forward pass, so a batch expected to take at most `inline_max_us` (from a
running average of the time per row) runs on the event loop instead.

Stacking rows never changes a row's result (each row of an MLP or a CNN is computed independently);
`tests/unit/engine/test_batching.py` pins that.

Each batcher counts what it did, in the terms of Triton's statistics extension (`statistics()`; the
node answers them at `/v2/models/{name}/stats`). The counts are plain integers updated on the event
loop, from clock readings the batcher takes anyway: the time a request waited (its submission to the
start of its batch) and the forward pass, timed in the thread that runs it. Collating and splitting are
not timed apart (microseconds). An answer from the response cache never reaches the batcher, which the
service tells (`cached`), as Triton counts it: a success and a wait of 0 ns, a `cache_hit` with its
lookup's time, never an inference or an execution; a miss adds its lookup's and its keeping's time to
`cache_miss`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgegen.config import BatchSettings
from edgegen.errors import DeadlineExceeded, ExecutorError, InvalidInput, Overloaded, Unloaded
from edgegen.executors.base import Executor
from edgegen.observe import tracing
from edgegen.observe.tracing import BatchTrace

log = logging.getLogger(__name__)
Feeds = Mapping[str, np.ndarray]


class BatchObserver(Protocol):
    def on_queue(self, model: str, depth: int, capacity: int) -> None: ...

    def on_batch(self, model: str, rows: int, requests: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class Duration:
    """How many times something happened and how long it took in all (Triton's `StatisticDuration`)."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchSize:
    """The forward passes of one batch size (rows) that succeeded, and their time in all."""

    rows: int
    executions: int
    ns: int


@dataclass(frozen=True)
class BatchStatistics:
    """What a batcher has done since it started. Per request: `success`, `fail`, `queue` (submission to
    the start of its batch) and `compute` (its batch's forward pass: a batch of k requests adds k
    times). `inference_count` counts the rows answered, `execution_count` the forward passes that
    succeeded; `last_inference` is when the last of those started, in seconds since the epoch (None:
    none yet)."""

    inference_count: int
    execution_count: int
    last_inference: float | None
    success: Duration
    fail: Duration
    queue: Duration
    compute: Duration
    batches: tuple[BatchSize, ...]
    cache_hit: Duration = Duration()
    cache_miss: Duration = Duration()


@dataclass(slots=True)
class _Tally:
    """The mutable counts behind `BatchStatistics`; only the batcher's event loop touches them."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference: float | None = None
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    by_size: dict[int, list[int]] = field(default_factory=dict)  # rows -> [executions, ns]
    cache_hit_count: int = 0
    cache_hit_ns: int = 0
    cache_miss_count: int = 0
    cache_miss_ns: int = 0


@dataclass(eq=False)
class _Request:
    feeds: Feeds
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]]
    queued: float  # clock reading at submission
    deadline: float
    trace: BatchTrace | None = None  # tracing on: its wait and its batch, told as spans once answered
    key: tuple[tuple[str, tuple[int, ...], str], ...] = field(init=False)

    def __post_init__(self) -> None:
        # Requests can share a batch only when every input agrees beyond the batch dimension.
        self.key = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(self.feeds.items()))


def _timed(run: Callable[[Feeds], dict[str, np.ndarray]], feeds: Feeds) -> tuple[dict[str, np.ndarray], int]:
    """`run(feeds)` and its time in ns, taken where it runs: a worker thread's wait for a busy event loop
    to take the result back is no part of the model's time (it was 10 ms of "compute" a request at 64
    clients, against 0.35 ms at one)."""
    started = time.perf_counter_ns()
    return run(feeds), time.perf_counter_ns() - started


def _expire(future: asyncio.Future[dict[str, np.ndarray]], model: str, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded(f"model {model!r} did not answer within {timeout_s:g} s"))


def collate(feeds: Sequence[Feeds]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Stack requests along the first dimension; return the batch and each request's row offset.

    >>> batch, offsets = collate([{"x": np.zeros((2, 3))}, {"x": np.ones((1, 3))}])
    >>> batch["x"].shape, offsets
    ((3, 3), [0, 2, 3])
    """
    offsets = [0]
    names = list(feeds[0])
    for item in feeds:
        offsets.append(offsets[-1] + len(item[names[0]]))
    if len(feeds) == 1:
        return dict(feeds[0]), offsets
    return {n: np.concatenate([item[n] for item in feeds], axis=0) for n in names}, offsets


def split(outputs: Mapping[str, np.ndarray], offsets: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut a batch's outputs back into one dict per request, by the offsets `collate` gave."""
    return [{n: a[offsets[i] : offsets[i + 1]] for n, a in outputs.items()} for i in range(len(offsets) - 1)]


class DynamicBatcher:
    """Bounded queue + batching workers in front of one model's executors (one worker each)."""

    def __init__(
        self,
        model: str,
        executors: Sequence[Executor],
        settings: BatchSettings,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self._executors = list(executors)
        self._settings = settings
        self._observer = observer
        self._clock = clock
        # Requests stack along the first dimension only when every input's first dimension takes any size.
        self.batched = all(spec.batched for spec in self._executors[0].inputs)
        self.max_rows = settings.max_batch_size if self.batched else 1
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=settings.max_queue_size)
        self._pool = ThreadPoolExecutor(max_workers=len(self._executors), thread_name_prefix=f"exec-{model}")
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        self._row_seconds = 0.0  # running average of forward-pass time per row; 0 until measured
        self._tally = _Tally()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def settings(self) -> BatchSettings:
        return self._settings

    @property
    def instances(self) -> int:
        """Forward passes that may run at once (one worker per executor)."""
        return len(self._executors)

    def statistics(self) -> BatchStatistics:
        """A snapshot of the counts (module docstring)."""
        t = self._tally
        # The batch started on the batcher's clock; told as wall-clock time only here, off the hot path.
        last = None if t.last_inference is None else time.time() - (self._clock() - t.last_inference)
        return BatchStatistics(
            inference_count=t.inference_count,
            execution_count=t.execution_count,
            last_inference=last,
            success=Duration(t.success_count, t.success_ns),
            fail=Duration(t.fail_count, t.fail_ns),
            queue=Duration(t.queue_count, t.queue_ns),
            compute=Duration(t.compute_count, t.compute_ns),
            batches=tuple(BatchSize(rows, n, ns) for rows, (n, ns) in sorted(t.by_size.items())),
            cache_hit=Duration(t.cache_hit_count, t.cache_hit_ns),
            cache_miss=Duration(t.cache_miss_count, t.cache_miss_ns),
        )

    def cached(self, hit: bool, ns: int) -> None:
        """A request the response cache answered (`hit`: its lookup took `ns`), or did not (`ns`: its
        lookup and keeping the answer the batcher gave)."""
        t = self._tally
        if not hit:
            t.cache_miss_count += 1
            t.cache_miss_ns += ns
            return
        t.cache_hit_count += 1
        t.cache_hit_ns += ns
        t.success_count += 1
        t.success_ns += ns
        t.queue_count += 1
        t.last_inference = self._clock()

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(e), name=f"batcher-{self.model}") for e in self._executors
        ]

    async def submit(self, feeds: Feeds, timeout_s: float) -> dict[str, np.ndarray]:
        """Queue one request (each input shaped (rows, ...)) and wait for its outputs.

        Raises Overloaded when the queue is full, DeadlineExceeded after `timeout_s` seconds.
        """
        if self._closed:
            raise Unloaded(f"model {self.model!r} was unloaded; retry shortly")
        rows = len(next(iter(feeds.values())))
        if rows > self.max_rows:
            raise InvalidInput(
                f"a request may hold at most {self.max_rows} samples for this model, got {rows}"
            )
        loop = asyncio.get_running_loop()
        queued = self._clock()
        request = _Request(feeds, rows, loop.create_future(), queued, queued + timeout_s)
        if (tracer := tracing.tracer) is not None:
            request.trace = tracer.batched()
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self._tally.fail_count += 1  # refused at the door: it took no time of the model's
            raise Overloaded(f"model {self.model!r} is at capacity; retry shortly") from None
        self._observe_queue()
        # One timer per request, cheaper than asyncio.timeout(); a worker skips expired requests.
        expiry = loop.call_later(timeout_s, _expire, request.future, self.model, timeout_s)
        try:
            return await request.future
        finally:
            expiry.cancel()

    async def drain(self) -> None:
        """Finish what is queued and running, then stop the workers and free the executors."""
        # Every request taken from the queue is marked done once answered (or skipped).
        await self._queue.join()
        await self.close()

    async def close(self) -> None:
        self._closed = True
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(Unloaded(f"model {self.model!r} was unloaded"))
        # A pass in flight reads the model: it ends before the model is freed, waited for off the loop.
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        for executor in self._executors:
            executor.close()

    # -- workers ------------------------------------------------------------------------------------
    async def _collect(self, carry: list[_Request]) -> list[_Request]:
        """Take one batch's requests: the carried-over one (or the next), then as many as fit."""
        first = carry.pop() if carry else await self._queue.get()
        batch, rows = [first], first.rows
        until = self._clock() + self._settings.max_queue_delay_us / 1e6
        while rows < self.max_rows:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = until - self._clock()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._queue.get()
                except TimeoutError:
                    break
            if item.key != first.key or rows + item.rows > self.max_rows:
                carry.append(item)  # starts the next batch
                break
            batch.append(item)
            rows += item.rows
        return batch

    async def _work(self, executor: Executor) -> None:
        loop = asyncio.get_running_loop()
        carry: list[_Request] = []
        while True:
            batch = await self._collect(carry)
            try:
                self._observe_queue()
                now = self._clock()
                live = [r for r in batch if not r.future.done() and r.deadline > now]
                if len(live) < len(batch):
                    self._failed([r for r in batch if r not in live], now, 0)
                if not live:
                    continue
                feeds, offsets = collate([r.feeds for r in live])
                wall_ns = time.time_ns() if tracing.tracer is not None else 0  # (for spans only)
                started = time.perf_counter_ns()
                try:
                    if 0 < self._row_seconds * offsets[-1] * 1e6 <= self._settings.inline_max_us:
                        outputs, elapsed_ns = _timed(executor.run, feeds)
                    else:
                        outputs, elapsed_ns = await loop.run_in_executor(
                            self._pool, _timed, executor.run, feeds
                        )
                except Exception:
                    log.exception("inference failed", extra={"model": self.model, "rows": offsets[-1]})
                    for r in live:
                        if not r.future.done():
                            r.future.set_exception(ExecutorError("the model failed on this input"))
                    self._failed(live, now, time.perf_counter_ns() - started)
                    continue
                self._row_seconds = self._estimate(elapsed_ns / 1e9 / offsets[-1])
                self._observe_batch(offsets[-1], len(live), elapsed_ns / 1e9)
                self._answer(live, split(outputs, offsets), now, elapsed_ns, wall_ns)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _estimate(self, per_row: float) -> float:
        """The running average of a row's time, with one more pass's reading. A pass is timed where it
        runs, so a pass that waited for the GIL (another thread held it) reads slow: one reading moves the
        average up by a fifth at most, and a model that really became slower is followed within tens of
        batches."""
        known = self._row_seconds
        if not known:
            return per_row
        return 0.8 * known + 0.2 * min(per_row, 2 * known)

    def _answer(
        self,
        live: list[_Request],
        results: list[dict[str, np.ndarray]],
        now: float,
        elapsed_ns: int,
        wall_ns: int = 0,
    ) -> None:
        """Hand each request its rows and count the batch, taken at clock reading `now`, whose forward
        pass took `elapsed_ns` from about `wall_ns` (since the epoch; read only with tracing on)."""
        t = self._tally
        t.execution_count += 1
        t.last_inference = now
        size = t.by_size.setdefault(sum(r.rows for r in live), [0, 0])
        size[0] += 1
        size[1] += elapsed_ns
        t.queue_count += len(live)
        t.compute_count += len(live)
        t.compute_ns += elapsed_ns * len(live)
        for r, result in zip(live, results, strict=True):
            waited = int((now - r.queued) * 1e9)
            if r.trace is not None:
                r.trace.ran(wall_ns, elapsed_ns, sum(q.rows for q in live), len(live))
            t.queue_ns += waited
            if r.future.done():  # expired, or its caller went away, while the batch ran
                t.fail_count += 1
                t.fail_ns += waited + elapsed_ns
                continue
            r.future.set_result(result)
            t.success_count += 1
            t.success_ns += waited + elapsed_ns
            t.inference_count += r.rows

    def _failed(self, requests: list[_Request], now: float, elapsed_ns: int) -> None:
        """Count requests that got no answer: skipped past their deadline, or in a batch that failed."""
        t = self._tally
        t.fail_count += len(requests)
        t.fail_ns += sum(int((now - r.queued) * 1e9) + elapsed_ns for r in requests)

    def _observe_queue(self) -> None:
        if self._observer is not None:
            try:
                self._observer.on_queue(self.model, self._queue.qsize(), self._queue.maxsize)
            except Exception:
                log.exception("queue observer failed")

    def _observe_batch(self, rows: int, requests: int, seconds: float) -> None:
        if self._observer is not None:
            try:
                self._observer.on_batch(self.model, rows, requests, seconds)
            except Exception:
                log.exception("batch observer failed")
