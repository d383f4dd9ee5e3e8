"""Request ids, metrics, the OpenAPI schema, readiness and hot swapping of versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from starlette.testclient import TestClient

from edgegen.config import Settings
from edgegen.executors import describe_model
from edgegen.modelkit.layers import mlp_forward
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.node.app import create_app
from edgegen.security.signing import Signer
from edgegen.store import ModelStore
from tests.conftest import make_layers
from tests.unit.node.conftest import admin_headers

SAMPLE = {"input_data": [1.0] * 64}


def test_request_id_is_echoed_when_sane_and_replaced_when_not(client: TestClient) -> None:
    assert (
        client.post("/predict", json=SAMPLE, headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    replaced = client.post("/predict", json=SAMPLE, headers={"X-Request-ID": "bad id\twith <tags>"})
    assert replaced.headers["x-request-id"] != "bad id\twith <tags>"
    assert len(replaced.headers["x-request-id"]) == 22
    assert client.post("/nope").headers["x-request-id"]


def test_metrics_count_requests_batches_and_errors(client: TestClient) -> None:
    client.post("/predict", json=SAMPLE)
    client.post("/predict", content=b"junk")
    text = client.get("/metrics").text
    assert 'edgegen_request_duration_seconds_count{method="POST",model="digits",route="/predict"}' in text
    assert 'edgegen_responses_total{route="/predict",status="400"} 1.0' in text
    assert 'edgegen_batch_size_count{model="digits"}' in text
    assert 'edgegen_inference_duration_seconds_bucket{le="0.001",model="digits"}' in text
    assert "edgegen_queue_depth" in text
    assert "process_resident_memory_bytes" in text


def test_openapi_lists_every_route(client: TestClient) -> None:
    paths = set(client.get("/openapi.json").json()["paths"])
    assert {
        "/predict",
        "/models/{name}/predict",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}",
        "/v2/models/{name}/versions/{version}/ready",
        "/v2/models/{name}/versions/{version}/infer",
        "/metrics",
    } <= paths


def test_activating_a_version_swaps_it_in_without_a_restart(client: TestClient, settings: Settings) -> None:
    store = ModelStore(settings.store_dir, describe=describe_model)
    new_layers = make_layers(seed=7)
    path = Path(settings.home) / "new.onnx"
    path.write_bytes(mlp_to_onnx(new_layers))
    store.add(path, "digits", "2", activate=True)
    client.portal.call(client.app.state.node.registry.refresh)  # what the store poller does
    answer = client.post("/predict", json=SAMPLE).json()["prediction"]
    expected = mlp_forward(new_layers, np.ones((1, 64), np.float32))
    np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)
    assert client.get("/v2/models/digits").json()["versions"] == ["1", "2"]


def test_a_model_that_fails_its_hash_is_not_served_and_the_node_is_not_ready(
    tmp_path: Path, store: ModelStore
) -> None:
    model = store.open("digits-tflite").model_path
    model.write_bytes(model.read_bytes() + b"tampered")
    settings = Settings(home=tmp_path, store=store.root, store_poll_s=0)
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False, headers=admin_headers(settings)) as client:
        for _ in range(500):
            if client.app.state.node.registry.loaded:
                break
            client.get("/v2/health/live")
        assert client.get("/v2/health/ready").status_code == 503
        assert client.post("/models/digits-tflite/predict", json=SAMPLE).status_code == 404
        assert client.post("/predict", json=SAMPLE).status_code == 200


def test_a_pushed_package_may_exceed_the_body_limit_other_requests_may_not(
    tmp_path: Path, store: ModelStore
) -> None:
    """The push route streams its body to disk up to `security.max_pull_bytes`; everything else keeps
    `max_body_bytes`."""
    Signer.local(tmp_path)  # a key this node trusts, so it checks pushed packages at all
    settings = Settings(home=tmp_path, store=store.root, store_poll_s=0, max_body_bytes=1024)
    large = b"\x1f\x8b" + bytes(4096)  # gzip's magic, then nothing a package holds
    app = create_app(settings)
    # On loopback: Starlette's Host "testserver" is no name a node takes admin changes under.
    headers = admin_headers(settings)
    with TestClient(app, "http://127.0.0.1", raise_server_exceptions=False, headers=headers) as c:
        pushed = c.put("/admin/models/digits/package", content=large)
        assert pushed.status_code == 422  # past the size limit, into the store's archive check
        assert c.put("/admin/models/digits/package", content=bytes(4096)).status_code == 400  # no archive
        assert c.post("/admin/models/digits/pull", content=large).status_code == 413
        assert c.post("/predict", content=large).status_code == 413
    assert not list(tmp_path.glob("edgegen-push-*"))  # nothing received is left behind


def test_a_model_taken_out_of_the_store_leaves_the_metrics_with_it(
    client: TestClient, settings: Settings
) -> None:
    """A model no longer served (its folder taken out of the store) takes its queue gauges along and is
    no longer counted as loaded: its last queue depth must not look like a live one to an alert.
    Before, `edgegen_models_loaded` said 2 and its gauges stayed as they were, for good."""
    assert client.post("/models/digits-tflite/predict", json=SAMPLE).status_code == 200
    assert client.post("/predict", json=SAMPLE).status_code == 200  # (digits)
    assert 'edgegen_queue_depth{model="digits-tflite"}' in client.get("/metrics").text
    shutil.rmtree(Path(settings.store_dir) / "digits-tflite")
    client.portal.call(client.app.state.node.registry.refresh)  # what the store poller does
    text = client.get("/metrics").text
    assert "edgegen_models_loaded 1.0" in text
    assert 'edgegen_queue_depth{model="digits-tflite"}' not in text
    assert 'edgegen_queue_capacity{model="digits-tflite"}' not in text
    assert 'edgegen_queue_depth{model="digits"}' in text


def test_an_active_version_that_will_not_load_leaves_the_one_served_and_the_node_ready(
    client: TestClient, settings: Settings
) -> None:
    """ACTIVE moves, under a running node, to a version that does not load here (its file damaged; or
    memory, a key the node lacks): the node serves on with the version before, stays ready, and says what
    it refused, as it does when it starts with such a store. Before, it marked the model failed: ready
    answered 503, and the gateway took the whole node out of its fleet for one bad change."""
    store = ModelStore(settings.store_dir, describe=describe_model)
    store.add(store.open("digits").model_path, "digits", "2", activate=False)
    damaged = store.open("digits", "2").model_path
    damaged.write_bytes(damaged.read_bytes() + b"tampered")
    (Path(settings.store_dir) / "digits" / "ACTIVE").write_text("2\n")  # as a copy of the store would
    client.portal.call(client.app.state.node.registry.refresh)  # what the store poller does
    assert client.get("/v2/health/ready").status_code == 200
    assert client.post("/predict", json=SAMPLE).status_code == 200
    status = client.get("/admin/status").json()
    assert (status["models"]["digits"], status["refused"]) == ("1", {"digits": "2"})
