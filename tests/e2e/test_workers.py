"""`--workers 2`: two processes on one port, each answer still the request's own, one /metrics view."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from edgegen.executors import load_executor
from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node2(node_home: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(node_home, "--workers", "2").start()
    # Ready means one worker answered ready; the other may still be loading its models. Each new
    # connection lands on either, so many ready answers in a row mean both are.
    streak = 0
    while streak < 20:
        ready = httpx.get(f"{process.url}/v2/health/ready").status_code == 200  # a new connection each
        streak = streak + 1 if ready else 0
    try:
        yield process
    finally:
        process.stop()


def test_two_worker_processes_serve_correct_answers(node2: NodeProcess, model_files: dict[str, Path]) -> None:
    assert node2.process is not None
    children = psutil.Process(node2.process.pid).children(recursive=True)
    assert len([c for c in children if "python" in c.name()]) >= 2

    inputs = np.random.default_rng(5).uniform(0, 16, (600, 64)).astype(np.float32)
    executor = load_executor(model_files["onnx"], "onnx")
    want = [executor.run({"input": x[None]})["logits"] for x in inputs]

    async def run() -> list[np.ndarray]:
        async with httpx.AsyncClient(base_url=node2.url, timeout=60) as client:
            gate = asyncio.Semaphore(32)

            async def one(x: np.ndarray) -> np.ndarray:
                async with gate:
                    response = await client.post("/predict", json={"input_data": x.tolist()})
                assert response.status_code == 200, response.text
                return np.array(response.json()["prediction"], dtype=np.float32)

            return await asyncio.gather(*(one(x) for x in inputs))

    got = asyncio.run(run())
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))

    # Each worker counts its own requests; /metrics adds them up whichever worker answers.
    text = httpx.get(f"{node2.url}/metrics").text
    count = re.search(
        r'edgegen_request_duration_seconds_count\{method="POST",model="digits",route="/predict"\} (\S+)', text
    )
    assert count is not None
    assert float(count.group(1)) == len(inputs)
