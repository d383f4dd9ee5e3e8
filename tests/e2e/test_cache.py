"""The response cache on a real node: repeated deterministic requests are answered from it with the
same body, sampled ones never are, tenants never share answers, activating a version drops the old
answers, the disk tier outlives a restart, and the metrics move with all of it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from edgegen.executors import describe_model
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.store import ModelStore
from tests.conftest import fill_store, make_layers
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import NodeProcess, metric, running, tenant_headers

CHAT = {
    "model": "tiny-llm",
    "messages": [{"role": "user", "content": "tell me"}],
    "max_tokens": 12,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def node(node_home: Path) -> Iterator[NodeProcess]:
    # Its metrics are read without a key: the per-model figures need model names in a public scrape.
    env = {**LLM_ENV, "EDGEGEN_STORE_POLL_S": "0.2", "EDGEGEN_SECURITY__METRICS_MODEL_NAMES": "true"}
    with running(NodeProcess(node_home, env=env, auth=True)) as process:
        yield process


@pytest.fixture(scope="module")
def acme(node: NodeProcess, node_home: Path) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=node.url, headers=tenant_headers(node_home, "acme"), timeout=60) as client:
        yield client


def sample(seed: int) -> list[float]:
    return np.random.default_rng(seed).uniform(0, 16, 64).round(3).tolist()  # type: ignore[no-any-return]


def test_a_repeated_prediction_is_a_hit_with_the_same_answer(node: NodeProcess, acme: httpx.Client) -> None:
    hits = metric(node, 'edgegen_cache_hits_total{model="digits",tier="memory"}')
    misses = metric(node, 'edgegen_cache_misses_total{model="digits"}')
    bypasses = metric(node, 'edgegen_cache_bypasses_total{model="digits"}')
    body = {"input_data": sample(1)}
    first = acme.post("/predict", json=body)
    second = acme.post("/predict", json={"input_data": [float(v) for v in body["input_data"]]})
    fresh = acme.post("/predict", json=body, headers={"Cache-Control": "no-cache"})
    assert [r.status_code for r in (first, second, fresh)] == [200, 200, 200]
    assert [r.headers["x-edgegen-cache"] for r in (first, second, fresh)] == ["miss", "hit", "bypass"]
    assert int(second.headers["age"]) >= 0
    assert first.content == second.content == fresh.content
    assert metric(node, 'edgegen_cache_hits_total{model="digits",tier="memory"}') == hits + 1
    assert metric(node, 'edgegen_cache_misses_total{model="digits"}') == misses + 1
    assert metric(node, 'edgegen_cache_bypasses_total{model="digits"}') == bypasses + 1
    assert metric(node, 'edgegen_cache_bytes{tier="memory"}') > 0
    assert metric(node, 'edgegen_cache_entries{tier="disk"}') >= 1


def test_kserve_hits_whatever_the_output_encoding(acme: httpx.Client) -> None:
    tensor = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": sample(2)}
    as_json = acme.post("/v2/models/digits/infer", json={"inputs": [tensor]})
    as_binary = acme.post(
        "/v2/models/digits/infer", json={"inputs": [tensor], "parameters": {"binary_data_output": True}}
    )
    assert as_json.headers["x-edgegen-cache"] == "miss"
    assert as_binary.headers["x-edgegen-cache"] == "hit"
    head = int(as_binary.headers["inference-header-content-length"])
    logits = np.frombuffer(as_binary.content[head:], dtype="<f4")
    np.testing.assert_array_equal(logits, np.asarray(as_json.json()["outputs"][0]["data"], dtype=np.float32))
    seed = acme.post("/predict", json={"input_data": tensor["data"]})
    assert seed.headers["x-edgegen-cache"] == "hit"  # the seed's route and KServe share the answer


def test_greedy_chat_is_cached_and_replays_as_a_stream(node: NodeProcess, acme: httpx.Client) -> None:
    generated = metric(node, 'edgegen_generated_tokens_total{model="tiny-llm"}')
    first = acme.post("/v1/chat/completions", json=CHAT)
    generated_once = metric(node, 'edgegen_generated_tokens_total{model="tiny-llm"}')
    second = acme.post("/v1/chat/completions", json=CHAT)
    assert (first.headers["x-edgegen-cache"], second.headers["x-edgegen-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["id"] != first.json()["id"]
    usage = second.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]
    assert usage["completion_tokens"] == first.json()["usage"]["completion_tokens"]
    with acme.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as stream:
        assert stream.headers["x-edgegen-cache"] == "hit"
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(orjson.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == first.json()["choices"][0]["message"]["content"]
    assert metric(node, 'edgegen_generated_tokens_total{model="tiny-llm"}') == generated_once > generated


def test_a_streamed_generation_is_recorded_for_the_next_request(acme: httpx.Client) -> None:
    order = {"model": "tiny-llm", "prompt": "once upon", "max_tokens": 10, "temperature": 0}
    with acme.stream("POST", "/v1/completions", json={**order, "stream": True}) as stream:
        assert stream.headers["x-edgegen-cache"] == "miss"
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    streamed = "".join(orjson.loads(e)["choices"][0]["text"] for e in events[:-1])
    again = acme.post("/v1/completions", json=order)
    assert again.headers["x-edgegen-cache"] == "hit"
    assert again.json()["choices"][0]["text"] == streamed


def test_only_deterministic_generations_are_cached(acme: httpx.Client) -> None:
    sampled = {**CHAT, "temperature": 0.9}
    assert [acme.post("/v1/chat/completions", json=sampled).headers["x-edgegen-cache"] for _ in "ab"] == [
        "bypass",
        "bypass",
    ]
    seeded = {**sampled, "seed": 42}
    first, second = (acme.post("/v1/chat/completions", json=seeded) for _ in "ab")
    assert (first.headers["x-edgegen-cache"], second.headers["x-edgegen-cache"]) == ("miss", "hit")
    assert first.json()["choices"] == second.json()["choices"]
    unseeded = {**seeded, "seed": -1}  # -1: no seed
    assert acme.post("/v1/chat/completions", json=unseeded).headers["x-edgegen-cache"] == "bypass"


def test_no_store_keeps_an_answer_out(acme: httpx.Client) -> None:
    body = {"input_data": sample(3)}
    assert (
        acme.post("/predict", json=body, headers={"Cache-Control": "no-store"}).headers["x-edgegen-cache"]
        == "miss"
    )
    assert acme.post("/predict", json=body).headers["x-edgegen-cache"] == "miss"
    assert acme.post("/predict", json=body).headers["x-edgegen-cache"] == "hit"


@pytest.mark.parametrize(
    "header",
    ["max-age=banana", "no-cache=" + "x" * 2000, "max-age=1.5, no-transform", ",,,", "max-age=99999999999"],
)
def test_odd_cache_control_is_harmless(acme: httpx.Client, header: str) -> None:
    response = acme.post("/predict", json={"input_data": sample(4)}, headers={"Cache-Control": header})
    assert response.status_code == 200
    assert response.headers["x-edgegen-cache"] in ("hit", "miss", "bypass")


def test_tenants_never_share_answers(node: NodeProcess, node_home: Path, acme: httpx.Client) -> None:
    body = {"input_data": sample(5)}
    assert acme.post("/predict", json=body).headers["x-edgegen-cache"] == "miss"
    assert acme.post("/predict", json=body).headers["x-edgegen-cache"] == "hit"
    with httpx.Client(base_url=node.url, headers=tenant_headers(node_home, "globex"), timeout=30) as globex:
        theirs = globex.post("/predict", json=body)
        assert theirs.headers["x-edgegen-cache"] == "miss"
        assert globex.post("/predict", json=body).headers["x-edgegen-cache"] == "hit"
    assert theirs.content == acme.post("/predict", json=body).content


def test_jobs_are_answered_from_the_cache_too(acme: httpx.Client) -> None:
    body = {"input_data": sample(6)}
    live = acme.post("/predict", json=body)
    job = acme.post("/v1/jobs", json={"method": "POST", "url": "/predict", "body": body}).json()
    until = time.monotonic() + 30
    while (state := acme.get(f"/v1/jobs/{job['id']}").json())["status"] != "succeeded":
        assert time.monotonic() < until, state
        time.sleep(0.02)
    assert state["response"]["body"] == live.json()


def test_activating_a_version_drops_the_old_answers(
    node: NodeProcess, node_home: Path, acme: httpx.Client
) -> None:
    body = {"input_data": sample(7)}
    old = acme.post("/predict", json=body)
    assert acme.post("/predict", json=body).headers["x-edgegen-cache"] == "hit"
    invalidated = metric(node, 'edgegen_cache_evictions_total{reason="invalidated",tier="memory"}')
    other = node_home / "other.onnx"
    other.write_bytes(mlp_to_onnx(make_layers(seed=11)))
    ModelStore(node_home / "models", describe=describe_model).add(other, "digits", activate=True)
    until = time.monotonic() + 30
    while (new := acme.post("/predict", json=body)).headers["x-edgegen-cache"] == "hit":
        assert time.monotonic() < until
        time.sleep(0.1)
    assert new.headers["x-edgegen-cache"] == "miss"
    assert new.json() != old.json()  # the new version's own answer, not the old one's
    assert metric(node, 'edgegen_cache_evictions_total{reason="invalidated",tier="memory"}') > invalidated


def test_the_disk_tier_outlives_a_restart(tmp_path: Path, model_files: dict[str, Path]) -> None:
    fill_store(tmp_path / "models", model_files)
    body = {"input_data": sample(8)}
    with running(NodeProcess(tmp_path)) as first:
        answer = httpx.post(f"{first.url}/predict", json=body)
        assert answer.headers["x-edgegen-cache"] == "miss"
    with running(NodeProcess(tmp_path)) as second:
        again = httpx.post(f"{second.url}/predict", json=body)
        assert again.headers["x-edgegen-cache"] == "hit"
        assert again.content == answer.content
        assert metric(second, 'edgegen_cache_hits_total{model="digits",tier="disk"}') == 1
