"""Triton's model configuration and statistics: the batcher's counts, the JSON shapes, the routes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import numpy as np
import pytest
from starlette.testclient import TestClient

from edgegen.config import BatchSettings, Settings
from edgegen.engine.batching import DynamicBatcher
from edgegen.errors import ExecutorError
from edgegen.node import triton
from edgegen.security.keys import KeyStore
from edgegen.store import Manifest, TensorSpec

X = np.ones((1, 64), np.float32)
# The durations perf_analyzer reads from each $model_stat's inference_stats, without checking they are there.
DURATIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


class Doubling:
    """A real executor (y = 2x) that fails on a row holding NaN."""

    def __init__(self, width: int = -1) -> None:
        self.inputs = (TensorSpec(name="x", dtype="float32", shape=(width, 3)),)
        self.outputs = (TensorSpec(name="y", dtype="float32", shape=(width, 3)),)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not np.isfinite(feeds["x"]).all():
            raise RuntimeError("poisoned input")
        return {"y": 2 * feeds["x"]}

    def close(self) -> None:
        pass


def manifest(first_dim: int) -> Manifest:
    return Manifest(
        name="m",
        version="1",
        format="onnx",
        inputs=[TensorSpec(name="x", dtype="float32", shape=(first_dim, 3))],
        outputs=[TensorSpec(name="y", dtype="float32", shape=(first_dim, 3))],
        files={},
    )


def metas(m: Manifest) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    def meta(s: TensorSpec) -> dict[str, object]:
        return {"name": s.name, "datatype": "FP32", "shape": list(s.shape)}

    return [meta(s) for s in m.inputs], [meta(s) for s in m.outputs]


async def test_statistics_count_rows_batches_requests_and_failures() -> None:
    batcher = DynamicBatcher("m", [Doubling()], BatchSettings(max_batch_size=4, max_queue_delay_us=20_000))
    batcher.start()
    sizes = [1, 2, 1, 3]
    await asyncio.gather(*(batcher.submit({"x": np.ones((n, 3), np.float32)}, 5) for n in sizes))
    poisoned = np.full((2, 3), np.nan, np.float32)
    with pytest.raises(ExecutorError):
        await batcher.submit({"x": poisoned}, 5)
    stats = batcher.statistics()
    await batcher.close()
    assert stats.inference_count == sum(sizes)
    assert stats.success.count == stats.queue.count == stats.compute.count == len(sizes)
    assert stats.fail.count == 1
    assert sum(b.rows * b.executions for b in stats.batches) == sum(sizes)
    assert stats.execution_count == sum(b.executions for b in stats.batches) < len(sizes)
    assert stats.compute.ns >= sum(b.ns for b in stats.batches) > 0
    assert stats.last_inference is not None
    assert abs(stats.last_inference - time.time()) < 5


def test_statistics_shape_is_tritons_with_every_field() -> None:
    stat = triton.model_statistics("m", "1", triton.IDLE)
    counts = {"inference_count", "execution_count", "last_inference"}
    assert set(stat) == {"name", "version", "inference_stats", "batch_stats", *counts}
    assert stat["inference_stats"] == {name: {"count": 0, "ns": 0} for name in DURATIONS}
    assert (stat["version"], stat["last_inference"], stat["batch_stats"]) == ("1", 0, [])


async def test_config_of_a_batched_model_leaves_the_batch_dimension_out() -> None:
    settings = BatchSettings(max_batch_size=8, max_queue_delay_us=500, max_queue_size=64, instances=2)
    batcher = DynamicBatcher("m", [Doubling(), Doubling()], settings)
    m = manifest(-1)
    config = triton.model_config(m, "onnxruntime_onnx", *metas(m), batcher)
    await batcher.close()
    assert config == {
        "name": "m",
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [3]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [3]}],
        "instance_group": [{"name": "m", "kind": "KIND_CPU", "count": 2}],
        "default_model_filename": "model.onnx",
        "dynamic_batching": {
            "max_queue_delay_microseconds": 500,
            "default_queue_policy": {"max_queue_size": 64},
        },
    }


async def test_config_of_a_model_without_a_batch_dimension_says_it_does_not_batch() -> None:
    batcher = DynamicBatcher("m", [Doubling(width=1)], BatchSettings())
    m = manifest(1)
    config = triton.model_config(m, "onnxruntime_onnx", *metas(m), batcher)
    await batcher.close()
    assert config["max_batch_size"] == 0
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [1, 3]}]
    assert "dynamic_batching" not in config


def test_routes_answer_config_and_statistics(client: TestClient) -> None:
    assert client.get("/v2").json()["extensions"] == [
        "binary_tensor_data",
        "model_configuration",
        "statistics",
    ]
    config = client.get("/v2/models/digits-tflite/versions/1/config").json()
    assert (config["backend"], config["max_batch_size"]) == ("litert", 32)
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": X.ravel().tolist()}]}
    assert client.post("/v2/models/digits/infer", json=body).status_code == 200
    (stat,) = client.get("/v2/models/digits/stats").json()["model_stats"]
    assert (stat["name"], stat["version"], stat["inference_count"], stat["execution_count"]) == (
        "digits",
        "1",
        1,
        1,
    )
    assert client.get("/v2/models/digits/versions/1/stats").json()["model_stats"][0]["inference_count"] == 1
    names = [s["name"] for s in client.get("/v2/models/stats").json()["model_stats"]]
    assert names == ["digits", "digits-tflite"]


@pytest.mark.parametrize(
    "path",
    ["/v2/models/nope/config", "/v2/models/digits/versions/2/config", "/v2/models/digits/versions/2/stats"],
)
def test_unknown_model_or_version_is_404_in_kserve_shape(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert set(response.json()) == {"error"}


def test_a_key_scoped_to_other_models_sees_only_its_own(client: TestClient, settings: Settings) -> None:
    keys = KeyStore(settings.keys_file)
    try:
        token = keys.create("user", models=("digits-tflite",), tenant="other")[0]
    finally:
        keys.close()
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/v2/models/digits/config", headers=headers).status_code == 403
    assert client.get("/v2/models/digits/stats", headers=headers).status_code == 403
    listed = client.get("/v2/models/stats", headers=headers).json()["model_stats"]
    assert [s["name"] for s in listed] == ["digits-tflite"]
