"""KServe v2 with the official `tritonclient[http]` client against a real node."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from edgegen.modelkit.layers import DenseLayer, mlp_forward
from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(node: NodeProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{node.port}")


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "edgegen"
    meta = client.get_model_metadata("digits-tflite")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("model", ["digits", "digits-tflite"])
def test_infer_binary_and_json(
    client: triton.InferenceServerClient, tiny_layers: list[DenseLayer], model: str, binary: bool
) -> None:
    x = np.random.default_rng(3).uniform(0, 16, (4, 64)).astype(np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer(
        model, [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)], request_id="r1"
    )
    np.testing.assert_allclose(result.as_numpy("logits"), mlp_forward(tiny_layers, x), rtol=1e-4, atol=1e-4)
    assert result.get_response()["id"] == "r1"


def test_errors_surface_as_exceptions_with_the_message(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [1, 63], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 63), np.float32))
    with pytest.raises(InferenceServerException, match="does not match"):
        client.infer("digits", [tensor])
    with pytest.raises(InferenceServerException, match="not served"):
        client.get_model_metadata("nope")


def test_default_request_without_outputs(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [2, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 64), np.float32))
    assert client.infer("digits", [tensor]).as_numpy("logits").shape == (2, 10)
