"""The seed protocol in-process: right answers, and a clear 4xx for every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
from starlette.testclient import TestClient

from edgegen.modelkit.layers import DenseLayer, mlp_forward

SAMPLE = np.arange(64, dtype=np.float32) % 17


def test_predict_answers_the_models_output_with_the_batch_dimension(
    client: TestClient, tiny_layers: list[DenseLayer]
) -> None:
    response = client.post("/predict", json={"input_data": SAMPLE.tolist()})
    assert response.status_code == 200
    prediction = np.array(response.json()["prediction"], dtype=np.float32)
    assert prediction.shape == (1, 10)
    np.testing.assert_allclose(prediction, mlp_forward(tiny_layers, SAMPLE[None]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["/models/digits/predict", "/models/digits-tflite/predict"])
def test_named_models_take_a_list_of_samples(
    client: TestClient, path: str, tiny_layers: list[DenseLayer]
) -> None:
    batch = np.stack([SAMPLE, SAMPLE[::-1]])
    response = client.post(path, json={"input_data": batch.tolist()})
    assert response.status_code == 200
    np.testing.assert_allclose(
        response.json()["prediction"], mlp_forward(tiny_layers, batch), rtol=1e-4, atol=1e-4
    )


def test_body_without_content_type_is_parsed_as_json(client: TestClient) -> None:
    response = client.post("/predict", content=f'{{"input_data": {SAMPLE.tolist()}}}'.encode())
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"input_data": [1, 2, 3]}', "shape"),
        (b'{"input_data": [[[1]]]}', "shape"),
        (b'{"input_data": ' + str(["a"] * 64).replace("'", '"').encode() + b"}", "numbers"),
        (b'{"input_data": [NaN' + b", 0" * 63 + b"]}", "not valid JSON"),
        (b'{"input_data": [Infinity' + b", 0" * 63 + b"]}", "not valid JSON"),
        (b'{"input_data": [1e39' + b", 0" * 63 + b"]}", "finite float32"),
        (b'{"input_data": [1' + b"0" * 40 + b", 0" * 63 + b"]}", "finite float32"),
        (b'{"input_data": [1e400' + b", 0" * 63 + b"]}", "JSON"),
        (b'{"inputs": []}', "input_data"),
        (b"[1, 2, 3]", "input_data"),
        (b"not json at all", "not valid JSON"),
        (b"", "empty"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"input_data": "\xff\xfe"}', "not valid JSON"),
    ],
)
def test_bad_input_is_a_400_with_a_json_error_and_the_node_keeps_serving(
    client: TestClient, body: bytes, fragment: str
) -> None:
    response = client.post("/predict", content=body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]
    assert "Traceback" not in response.text
    assert "/" not in response.json()["error"]  # no paths
    assert client.post("/predict", json={"input_data": SAMPLE.tolist()}).status_code == 200


@pytest.mark.parametrize("path", ["/models/nope/predict", "/models/DIGITS/predict"])
def test_unknown_model_names_are_404(client: TestClient, path: str) -> None:
    response = client.post(path, json={"input_data": SAMPLE.tolist()})
    assert response.status_code == 404
    assert "error" in response.json()


@pytest.mark.parametrize(
    "path",
    [
        "/models/..%2f..%2fetc%2fpasswd/predict",
        "/models/%2e%2e/predict",
        "/models/%00/predict",
        "/models/%2Fetc%2Fpasswd/predict",
    ],
)
def test_a_model_name_that_is_no_plain_path_segment_is_400(client: TestClient, path: str) -> None:
    """Refused by the one path reading (security/paths.py) before any route sees it."""
    response = client.post(path, json={"input_data": SAMPLE.tolist()})
    assert response.status_code == 400
    assert "request path" in response.json()["error"]


def test_body_over_the_limit_is_413_before_it_is_read(client: TestClient) -> None:
    big = b'{"input_data": [' + b"0," * 140_000 + b"0]}"
    response = client.post("/predict", content=big)
    assert response.status_code == 413
    assert "exceeds" in response.json()["error"]


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks():  # no Content-Length: the server counts as it reads
        yield b'{"input_data": ['
        for _ in range(100):
            yield b"0," * 3000
        yield b"0]}"

    response = client.post("/predict", content=chunks())
    assert response.status_code == 413


def test_headers_over_the_limit_are_431(client: TestClient) -> None:
    response = client.post("/predict", json={"input_data": SAMPLE.tolist()}, headers={"X-Big": "a" * 100_000})
    assert response.status_code == 431


def test_wrong_method_and_unknown_route(client: TestClient) -> None:
    assert client.get("/predict").status_code == 405
    assert client.get("/nope").json() == {"error": "not found"}
