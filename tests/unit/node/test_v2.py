"""KServe v2 in-process: metadata, JSON and binary tensors, and refusals."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from edgegen.modelkit.layers import DenseLayer, mlp_forward

X = (np.arange(128, dtype=np.float32) % 17).reshape(2, 64)


def infer_body(**overrides: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": X.ravel().tolist()}
    tensor.update(overrides)
    return {"inputs": [tensor]}


def test_health_and_server_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]


def test_model_metadata_and_readiness(client: TestClient) -> None:
    meta = client.get("/v2/models/digits").json()
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert client.get("/v2/models/digits-tflite/versions/1").json()["platform"] == "tensorflowlite"
    assert client.get("/v2/models/digits/ready").status_code == 200
    assert client.get("/v2/models/digits/versions/1/ready").status_code == 200
    assert client.get("/v2/models/digits/versions/2/ready").status_code == 404
    assert client.get("/v2/models/nope/ready").status_code == 404


def test_json_inference(client: TestClient, tiny_layers: list[DenseLayer]) -> None:
    body = infer_body()
    body["id"] = "req-1"
    answer = client.post("/v2/models/digits/infer", json=body).json()
    assert answer["id"] == "req-1"
    assert answer["model_version"] == "1"
    (out,) = answer["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [2, 10])
    np.testing.assert_allclose(
        np.reshape(out["data"], (2, 10)), mlp_forward(tiny_layers, X), rtol=1e-5, atol=1e-5
    )


def test_nested_data_is_accepted(client: TestClient) -> None:
    response = client.post("/v2/models/digits/versions/1/infer", json=infer_body(data=X.tolist()))
    assert response.status_code == 200


def test_binary_tensors_both_ways(client: TestClient, tiny_layers: list[DenseLayer]) -> None:
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [2, 64],
                "datatype": "FP32",
                "parameters": {"binary_data_size": X.nbytes},
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    response = client.post(
        "/v2/models/digits-tflite/infer",
        content=head + X.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert response.status_code == 200
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    (out,) = meta["outputs"]
    assert out["parameters"]["binary_data_size"] == 2 * 10 * 4
    logits = np.frombuffer(response.content[length:], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(logits, mlp_forward(tiny_layers, X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (infer_body(datatype="FP64"), "datatype must be FP32"),
        (infer_body(shape=[2, 63]), "does not match"),
        (infer_body(shape=[128]), "does not match"),
        (infer_body(shape=[2, -64]), "does not match"),
        (infer_body(shape=["2", 64]), "list of integers"),
        (infer_body(data=[1.0] * 10), "needs 128"),
        (infer_body(data=["x"] * 128), "FP32"),
        (infer_body(data=[True] * 128), "FP32"),
        (infer_body(data="abc"), "must be a list"),
        (infer_body(data=[1e39] * 128), "finite"),
        (infer_body(name="other"), "unknown input"),
        (infer_body(parameters="x"), "parameters"),
        (infer_body(parameters={"binary_data_size": 4}), "binary_data_size"),
        ({"inputs": "x"}, "inputs"),
        ({"inputs": [5]}, "object"),
        ({"inputs": []}, "missing inputs"),
        ({**infer_body(), "outputs": [{"name": "nope"}]}, "unknown output"),
        ({**infer_body(), "id": 5}, "id must be a string"),
        ({"inputs": [infer_body()["inputs"][0]] * 2}, "given twice"),
    ],
)
def test_bad_inference_requests_are_400(client: TestClient, body: dict[str, Any], fragment: str) -> None:
    response = client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


def test_bad_binary_header_length_is_400(client: TestClient) -> None:
    response = client.post(
        "/v2/models/digits/infer", content=b"{}", headers={"Inference-Header-Content-Length": "999"}
    )
    assert response.status_code == 400


def test_unknown_model_and_version_are_404(client: TestClient) -> None:
    assert client.post("/v2/models/nope/infer", json=infer_body()).status_code == 404
    response = client.post("/v2/models/digits/versions/9/infer", json=infer_body())
    assert response.status_code == 404
    assert "not served" in response.json()["error"]
