"""Triton's model-configuration and statistics extensions: the JSON Triton answers, from what a node knows.

perf_analyzer reads both before it measures anything: the configuration for the batch dimension and the
scheduler (`max_batch_size`, `dynamic_batching`), the statistics before and after each measurement to
split the server's time into queueing and computing. Nothing here is configured by hand: the
configuration is derived from the manifest and the batcher's settings, the statistics are the batcher's
counts (engine/batching.py).

    config  {"name", "platform", "backend", "max_batch_size", "input": [{"name", "data_type", "dims"}],
             "output": [...], "dynamic_batching": {"max_queue_delay_microseconds", "default_queue_policy"},
             "instance_group": [{"name", "kind", "count"}], "default_model_filename"}
    stats   {"model_stats": [{"name", "version", "last_inference", "inference_count", "execution_count",
             "inference_stats": {"success", "fail", "queue", "compute_input", "compute_infer",
             "compute_output", "cache_hit", "cache_miss"}, "batch_stats": [{"batch_size", "compute_input",
             "compute_infer", "compute_output"}]}]}            (each duration: {"count", "ns"})

Every statistics field is always present, zeros included: perf_analyzer reads `cache_hit` and
`cache_miss` without checking that they exist. They count the response cache's answers and misses as
Triton counts its own (engine/batching.py `cached`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgegen.engine.batching import BatchStatistics, Duration, DynamicBatcher
from edgegen.store import Manifest

# The runtime that runs each format here, as Triton's `backend` names it (Triton has no LiteRT backend).
BACKENDS = {"onnx": "onnxruntime", "tflite": "litert"}
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")
# The counts of a model with no batcher: a text model, which answers no KServe inference.
IDLE = BatchStatistics(0, 0, None, Duration(), Duration(), Duration(), Duration(), ())


def config_type(datatype: str) -> str:
    """Triton's configuration enum for a KServe datatype.

    >>> config_type("FP32"), config_type("BYTES")
    ('TYPE_FP32', 'TYPE_STRING')
    """
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _tensor(meta: Mapping[str, Any], batched: bool) -> dict[str, Any]:
    # Triton's rule: with max_batch_size > 0 the batch dimension is implied, so `dims` leave it out.
    shape = list(meta["shape"])
    return {
        "name": meta["name"],
        "data_type": config_type(meta["datatype"]),
        "dims": shape[1:] if batched else shape,
    }


def model_config(
    manifest: Manifest,
    platform: str,
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    batcher: DynamicBatcher,
) -> dict[str, Any]:
    """Triton's model configuration of a fixed-shape model; `inputs` and `outputs` as the KServe
    metadata describes them (name, datatype, shape), so the two always agree.

    A model whose inputs do not all take any batch size is not batched: `max_batch_size` 0, full
    `dims` and no `dynamic_batching`, as Triton says of such a model.
    """
    batched = batcher.batched
    settings = batcher.settings
    config: dict[str, Any] = {
        "name": manifest.name,
        "platform": platform,
        "backend": BACKENDS[manifest.format],
        "max_batch_size": batcher.max_rows if batched else 0,
        "input": [_tensor(t, batched) for t in inputs],
        "output": [_tensor(t, batched) for t in outputs],
        "instance_group": [{"name": manifest.name, "kind": "KIND_CPU", "count": batcher.instances}],
        "default_model_filename": manifest.model_file,
    }
    if batched:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": settings.max_queue_delay_us,
            "default_queue_policy": {"max_queue_size": settings.max_queue_size},
        }
    return config


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def model_statistics(name: str, version: str, stats: BatchStatistics) -> dict[str, Any]:
    """One `$model_stat` of Triton's statistics extension.

    Collating inputs and splitting outputs are not timed apart from the forward pass (microseconds): they
    count with 0 ns, so perf_analyzer's averages stay defined.
    """
    compute = stats.compute
    untimed = _duration(compute.count, 0)
    last = 0 if stats.last_inference is None else int(stats.last_inference * 1000)
    return {
        "name": name,
        "version": version,
        "last_inference": last,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            "success": _duration(stats.success.count, stats.success.ns),
            "fail": _duration(stats.fail.count, stats.fail.ns),
            "queue": _duration(stats.queue.count, stats.queue.ns),
            "compute_input": untimed,
            "compute_infer": _duration(compute.count, compute.ns),
            "compute_output": untimed,
            "cache_hit": _duration(stats.cache_hit.count, stats.cache_hit.ns),
            "cache_miss": _duration(stats.cache_miss.count, stats.cache_miss.ns),
        },
        "batch_stats": [
            {
                "batch_size": size.rows,
                "compute_input": _duration(size.executions, 0),
                "compute_infer": _duration(size.executions, size.ns),
                "compute_output": _duration(size.executions, 0),
            }
            for size in stats.batches
        ],
    }
