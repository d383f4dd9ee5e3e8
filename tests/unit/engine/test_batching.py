from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegen.config import BatchSettings
from edgegen.engine.batching import DynamicBatcher, collate, split
from edgegen.errors import DeadlineExceeded, ExecutorError, InvalidInput, Overloaded
from edgegen.executors import load_executor
from edgegen.store import TensorSpec
from tests.threaded import turns_while_held


class RecordingExecutor:
    """A real executor (y = 2x + row sum) that records batch sizes and can be held at a gate."""

    inputs = (TensorSpec(name="x", dtype="float32", shape=(-1, 3)),)
    outputs = (TensorSpec(name="y", dtype="float32", shape=(-1, 3)),)

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads: list[int] = []  # the thread each batch ran in
        self.gate = threading.Event()
        self.gate.set()
        self.stall_s = 0.0  # the next batch takes this long more (the GIL held by another thread)
        self.closed = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.wait(5)
        x = feeds["x"]
        self.batches.append(len(x))
        self.threads.append(threading.get_ident())
        if self.stall_s:
            time.sleep(self.stall_s)
            self.stall_s = 0.0
        if not np.isfinite(x).all():
            raise RuntimeError("poisoned input")
        return {"y": 2 * x + x.sum(axis=1, keepdims=True)}

    def close(self) -> None:
        self.closed = True


def rows(n: int, start: float) -> np.ndarray:
    return np.arange(start, start + 3 * n, dtype=np.float32).reshape(n, 3)


@given(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=12))
def test_collate_then_split_returns_each_request_its_own_rows(sizes: list[int]) -> None:
    feeds = [{"x": rows(n, 100 * i)} for i, n in enumerate(sizes)]
    batch, offsets = collate(feeds)
    assert batch["x"].shape == (sum(sizes), 3)
    parts = split({"y": batch["x"] * 2}, offsets)
    for item, part in zip(feeds, parts, strict=True):
        np.testing.assert_array_equal(part["y"], item["x"] * 2)


async def test_concurrent_requests_are_batched_and_answered_correctly() -> None:
    executor = RecordingExecutor()
    batcher = DynamicBatcher("m", [executor], BatchSettings(max_batch_size=8, max_queue_delay_us=20_000))
    batcher.start()
    inputs = [rows(1, 10 * i) for i in range(20)]
    results = await asyncio.gather(*(batcher.submit({"x": x}, 5) for x in inputs))
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result["y"], 2 * x + x.sum(axis=1, keepdims=True))
    assert max(executor.batches) == 8
    assert sum(executor.batches) == 20
    await batcher.close()
    assert executor.closed


async def test_batch_never_exceeds_max_rows_and_oversized_request_is_refused() -> None:
    executor = RecordingExecutor()
    batcher = DynamicBatcher("m", [executor], BatchSettings(max_batch_size=4, max_queue_delay_us=10_000))
    batcher.start()
    await asyncio.gather(*(batcher.submit({"x": rows(3, i)}, 5) for i in range(5)))
    assert max(executor.batches) <= 4
    with pytest.raises(InvalidInput, match="at most 4"):
        await batcher.submit({"x": rows(5, 0)}, 5)
    await batcher.close()


async def test_full_queue_answers_overloaded_at_once() -> None:
    executor = RecordingExecutor()
    executor.gate.clear()
    batcher = DynamicBatcher("m", [executor], BatchSettings(max_batch_size=1, max_queue_size=2))
    batcher.start()
    running = asyncio.create_task(batcher.submit({"x": rows(1, 0)}, 5))
    await asyncio.sleep(0.05)  # the worker holds the first request at the gate
    waiting = [asyncio.create_task(batcher.submit({"x": rows(1, i)}, 5)) for i in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await batcher.submit({"x": rows(1, 9)}, 5)
    executor.gate.set()
    await asyncio.gather(running, *waiting)
    await batcher.close()


async def test_request_past_its_deadline_gets_deadline_exceeded_and_is_skipped() -> None:
    executor = RecordingExecutor()
    executor.gate.clear()
    batcher = DynamicBatcher("m", [executor], BatchSettings(max_batch_size=1))
    batcher.start()
    first = asyncio.create_task(batcher.submit({"x": rows(1, 0)}, 5))
    await asyncio.sleep(0.05)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit({"x": rows(1, 1)}, 0.05)
    executor.gate.set()
    await first
    await asyncio.sleep(0.05)
    assert executor.batches == [1]  # the expired request never ran
    await batcher.close()


async def test_executor_failure_fails_only_that_batch() -> None:
    executor = RecordingExecutor()
    batcher = DynamicBatcher("m", [executor], BatchSettings(max_batch_size=1))
    batcher.start()
    bad = rows(1, 0)
    bad[0, 0] = np.nan
    with pytest.raises(ExecutorError):
        await batcher.submit({"x": bad}, 5)
    good = await batcher.submit({"x": rows(1, 0)}, 5)
    assert good["y"].shape == (1, 3)
    await batcher.close()


async def test_requests_with_different_trailing_shapes_are_not_mixed() -> None:
    class AnyWidth(RecordingExecutor):
        inputs = (TensorSpec(name="x", dtype="float32", shape=(-1, -1)),)

    executor = AnyWidth()
    batcher = DynamicBatcher("m", [executor], BatchSettings(max_batch_size=8, max_queue_delay_us=10_000))
    batcher.start()
    wide = np.ones((1, 5), np.float32)
    narrow = np.ones((1, 2), np.float32)
    results = await asyncio.gather(*(batcher.submit({"x": x}, 5) for x in (wide, narrow, wide, narrow)))
    assert [r["y"].shape for r in results] == [(1, 5), (1, 2), (1, 5), (1, 2)]
    await batcher.close()


async def test_drain_answers_queued_requests_before_closing() -> None:
    executor = RecordingExecutor()
    executor.gate.clear()
    batcher = DynamicBatcher("m", [executor], BatchSettings(max_batch_size=2))
    batcher.start()
    pending = [asyncio.create_task(batcher.submit({"x": rows(1, i)}, 5)) for i in range(5)]
    await asyncio.sleep(0.02)
    draining = asyncio.create_task(batcher.drain())
    executor.gate.set()
    await draining
    assert all(task.result()["y"].shape == (1, 3) for task in pending)
    assert executor.closed


async def test_closing_while_a_pass_runs_waits_for_it_off_the_event_loop() -> None:
    """The node stopping while a forward pass runs in its thread: the executors are freed only after the
    pass ends, and the event loop serves on meanwhile. Before, the pass was waited for on the loop."""
    executor = RecordingExecutor()
    batcher = DynamicBatcher("m", [executor], BatchSettings(max_batch_size=1, inline_max_us=0))
    batcher.start()
    executor.gate.clear()
    pending = asyncio.create_task(batcher.submit({"x": rows(1, 0)}, 5))
    await asyncio.sleep(0.05)  # the pass waits at the gate, in the thread
    assert await turns_while_held(batcher.close(), executor.gate) >= 10
    assert executor.closed
    assert executor.batches == [1]
    pending.cancel()


async def test_one_stalled_forward_pass_does_not_send_the_next_to_a_thread() -> None:
    """A batch is timed as it runs, so a pass that waited for the GIL (the tracing exporter's thread
    held it) reads as a slow model: it moved the estimate past `inline_max_us` and sent the next batches
    through a worker thread, ~100 µs a hand-off, for a stall of a few hundred µs."""
    executor = RecordingExecutor()
    batcher = DynamicBatcher("m", [executor], BatchSettings(max_batch_size=1, inline_max_us=2_000))
    batcher.start()
    for i in range(5):  # the first runs in a thread (nothing known yet); the estimate is learnt
        await batcher.submit({"x": rows(1, i)}, 5)
    executor.stall_s = 0.05
    await batcher.submit({"x": rows(1, 5)}, 5)
    for i in range(3):
        await batcher.submit({"x": rows(1, 6 + i)}, 5)
    loop_thread = threading.get_ident()
    assert executor.threads[-4:] == [loop_thread] * 4  # the stalled pass and the three after it: inline
    await batcher.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=16))
def test_batching_never_changes_a_result(model_files: dict[str, Path], sizes: list[int]) -> None:
    """Real ONNX and TFLite models: outputs inside a batch equal the outputs one by one."""
    for fmt in ("onnx", "tflite"):
        alone = load_executor(model_files[fmt], fmt)
        batched = load_executor(model_files[fmt], fmt)
        rng = np.random.default_rng(sum(sizes))
        inputs = [rng.uniform(0, 16, (n, 64)).astype(np.float32) for n in sizes]
        expected = [alone.run({"input": x})["logits"] for x in inputs]

        async def serve(batched=batched, inputs=inputs) -> list[dict[str, np.ndarray]]:
            batcher = DynamicBatcher(
                "m", [batched], BatchSettings(max_batch_size=64, max_queue_delay_us=5_000)
            )
            batcher.start()
            try:
                return await asyncio.gather(*(batcher.submit({"input": x}, 5) for x in inputs))
            finally:
                await batcher.close()

        for want, got in zip(expected, asyncio.run(serve()), strict=True):
            np.testing.assert_array_equal(got["logits"], want)  # bit for bit
        alone.close()
