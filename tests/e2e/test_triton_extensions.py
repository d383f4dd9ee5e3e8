"""Triton's model configuration and statistics extensions, read by the official `tritonclient[http]` from
a real node with authentication on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from edgegen.security.keys import KeyStore
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import NodeProcess, running

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def node(node_home: Path) -> Iterator[NodeProcess]:
    """This module's own node: with authentication on, so that model scopes apply."""
    with running(NodeProcess(node_home, env=LLM_ENV, auth=True)) as process:
        yield process


@pytest.fixture
def client(node: NodeProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{node.port}")


def digits_stats(client: triton.InferenceServerClient, node: NodeProcess) -> dict[str, Any]:
    (stat,) = client.get_inference_statistics("digits", headers=node.headers)["model_stats"]
    assert isinstance(stat, dict)
    return stat


def test_config_describes_digits_as_triton_does(
    client: triton.InferenceServerClient, node: NodeProcess
) -> None:
    assert {"model_configuration", "statistics"} <= set(
        client.get_server_metadata(headers=node.headers)["extensions"]
    )
    config = client.get_model_config("digits", headers=node.headers)
    assert (config["name"], config["platform"], config["backend"]) == (
        "digits",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config["max_batch_size"] == 32
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    assert config["instance_group"] == [{"name": "digits", "kind": "KIND_CPU", "count": 1}]
    assert client.get_model_config("digits", "1", headers=node.headers) == config


def test_statistics_count_exactly_what_was_sent(
    client: triton.InferenceServerClient, node: NodeProcess
) -> None:
    before = digits_stats(client, node)
    sizes = [1, 3, 2, 5]
    rng = np.random.default_rng(18)  # distinct inputs: no answer may come from the response cache
    for n in sizes:
        tensor = triton.InferInput("input", [n, 64], "FP32")
        tensor.set_data_from_numpy(rng.uniform(0, 16, (n, 64)).astype(np.float32))
        client.infer("digits", [tensor], headers=node.headers)
    after = digits_stats(client, node)
    assert after["version"] == "1"
    # One client, one request at a time: every request is a batch of its own.
    assert after["inference_count"] - before["inference_count"] == sum(sizes)
    assert after["execution_count"] - before["execution_count"] == len(sizes)
    for name in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        added = after["inference_stats"][name]["count"] - before["inference_stats"][name]["count"]
        assert added == len(sizes), name
    assert after["inference_stats"]["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert after["inference_stats"]["fail"] == before["inference_stats"]["fail"]
    executions = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    executed_before = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    assert {size: executions[size] - executed_before.get(size, 0) for size in sizes} == dict.fromkeys(
        sizes, 1
    )
    assert after["last_inference"] >= before["last_inference"]
    assert abs(after["last_inference"] / 1000 - time.time()) < 60  # milliseconds since the epoch
    assert client.get_inference_statistics("digits", "1", headers=node.headers)["model_stats"] == [after]


def test_answers_from_the_response_cache_are_counted_as_triton_counts_its_own(
    client: triton.InferenceServerClient, node: NodeProcess
) -> None:
    """A hit is a success and a cache_hit, never an inference or an execution; the first asking is a
    cache_miss. perf_analyzer reads them to split the server's time (they were always zero)."""
    before = digits_stats(client, node)
    tensor = triton.InferInput("input", [2, 64], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(19).uniform(0, 16, (2, 64)).astype(np.float32))
    first = client.infer("digits", [tensor], headers=node.headers).as_numpy("logits")
    again = client.infer("digits", [tensor], headers=node.headers).as_numpy("logits")
    np.testing.assert_array_equal(first, again)
    after = digits_stats(client, node)

    def added(name: str) -> tuple[int, int]:
        now, then = after["inference_stats"][name], before["inference_stats"][name]
        return now["count"] - then["count"], now["ns"] - then["ns"]

    (misses, miss_ns), (hits, hit_ns) = added("cache_miss"), added("cache_hit")
    assert (misses, hits) == (1, 1)
    assert miss_ns > 0
    assert hit_ns > 0
    assert added("success")[0] == added("queue")[0] == 2  # the hit too, as Triton counts it
    assert added("compute_infer")[0] == 1
    assert after["inference_count"] - before["inference_count"] == 2  # the rows computed, once
    assert after["execution_count"] - before["execution_count"] == 1


def test_unknown_model_or_version_is_404(client: triton.InferenceServerClient, node: NodeProcess) -> None:
    for call in (
        lambda: client.get_model_config("nope", headers=node.headers),
        lambda: client.get_model_config("digits", "7", headers=node.headers),
        lambda: client.get_inference_statistics("nope", headers=node.headers),
        lambda: client.get_inference_statistics("digits", "7", headers=node.headers),
    ):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "404"


def test_a_text_model_has_no_config_and_no_kserve_inferences(
    client: triton.InferenceServerClient, node: NodeProcess
) -> None:
    with pytest.raises(InferenceServerException, match="generates text") as caught:
        client.get_model_config("tiny-llm", headers=node.headers)
    assert caught.value.status() == "400"
    (stat,) = client.get_inference_statistics("tiny-llm", headers=node.headers)["model_stats"]
    assert (stat["inference_count"], stat["execution_count"], stat["batch_stats"]) == (0, 0, [])


def test_a_key_scoped_to_other_models_is_refused(
    client: triton.InferenceServerClient, node: NodeProcess
) -> None:
    keys = KeyStore(node.home / "security" / "keys.sqlite")
    try:
        token = keys.create("user", models=("digits-tflite",), tenant="other")[0]
    finally:
        keys.close()
    headers = {"Authorization": f"Bearer {token}"}
    for call in (
        lambda: client.get_model_config("digits", headers=headers),
        lambda: client.get_inference_statistics("digits", headers=headers),
    ):
        with pytest.raises(InferenceServerException, match="may not use model") as caught:
            call()
        assert caught.value.status() == "403"
    listed = client.get_inference_statistics(headers=headers)["model_stats"]
    assert [s["name"] for s in listed] == ["digits-tflite"]
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_config("digits")  # no key at all
    assert caught.value.status() == "401"
