"""KServe v2 over gRPC, with the official `tritonclient.grpc` (and its generated stub for what the client
cannot send: typed contents, malformed requests) against a real node with authentication on. The same
checks as `tritonclient.http` passes (test_triton_client.py, test_triton_extensions.py), and the gRPC
parts of its own: status codes, the message limit, answers under load."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from edgegen.modelkit.layers import DenseLayer, mlp_forward
from edgegen.security.keys import KeyStore
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import NodeProcess, free_port, running

pytestmark = pytest.mark.e2e


class GrpcNode(NodeProcess):
    def __init__(self, home: Path, **env: str) -> None:
        self.grpc_port = free_port()
        super().__init__(
            home,
            "--grpc-port",
            str(self.grpc_port),
            env={**LLM_ENV, "EDGEGEN_STORE_POLL_S": "0", **env},
            auth=True,
        )

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


@pytest.fixture(scope="module")
def node(node_home: Path) -> Iterator[GrpcNode]:
    # A small message limit, so that the limit test sends little.
    with running(GrpcNode(node_home, EDGEGEN_MAX_BODY_BYTES="65536")) as process:
        yield process


@pytest.fixture
def client(node: GrpcNode) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=node.grpc_url) as made:
        yield made


@pytest.fixture
def stub(node: GrpcNode) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(node.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def auth(node: GrpcNode) -> dict[str, str]:
    """The admin key as tritonclient.grpc sends headers: as metadata, whose keys are lower case."""
    return {"authorization": f"Bearer {node.admin_key}"}


def metadata(node: GrpcNode) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {node.admin_key}")]


def digits_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_health_and_metadata(client: triton.InferenceServerClient, node: GrpcNode) -> None:
    headers = auth(node)
    assert client.is_server_live(headers=headers)
    assert client.is_server_ready(headers=headers)
    assert client.is_model_ready("digits", headers=headers)
    assert not client.is_model_ready("nope", headers=headers)
    server = client.get_server_metadata(headers=headers, as_json=True)
    assert server["name"] == "edgegen"
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(server["extensions"])
    meta = client.get_model_metadata("digits-tflite", headers=headers, as_json=True)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["platform"] == "tensorflowlite"


def test_config_and_statistics_are_the_http_protocol_s(
    client: triton.InferenceServerClient, node: GrpcNode
) -> None:
    http = triton_http.InferenceServerClient(url=f"127.0.0.1:{node.port}")
    config = client.get_model_config("digits", headers=auth(node), as_json=True)["config"]
    as_http = http.get_model_config("digits", headers=node.headers)
    assert config["max_batch_size"] == as_http["max_batch_size"] == 32
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["64"]}]
    assert config["instance_group"] == [{"name": "digits", "kind": "KIND_CPU", "count": 1}]
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert "dynamic_batching" in config

    def stats() -> dict[str, int]:
        (stat,) = client.get_inference_statistics("digits", headers=auth(node), as_json=True)["model_stats"]
        return {k: int(stat.get(k, 0)) for k in ("inference_count", "execution_count")}

    before = stats()
    rng = np.random.default_rng(28)  # distinct inputs: the response cache answers none of them
    for n in (1, 3, 2):
        client.infer(
            "digits", [digits_input(rng.uniform(0, 16, (n, 64)).astype(np.float32))], headers=auth(node)
        )
    after = stats()
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["execution_count"] - before["execution_count"] == 3
    listed = client.get_inference_statistics(headers=auth(node), as_json=True)["model_stats"]
    assert {"digits", "digits-tflite", "tiny-llm"} <= {s["name"] for s in listed}
    with pytest.raises(InferenceServerException, match="generates text") as caught:
        client.get_model_config("tiny-llm", headers=auth(node))
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("model", ["digits", "digits-tflite"])
def test_infer_raw_contents(
    client: triton.InferenceServerClient, node: GrpcNode, tiny_layers: list[DenseLayer], model: str
) -> None:
    x = np.random.default_rng(3).uniform(0, 16, (4, 64)).astype(np.float32)
    result = client.infer(
        model,
        [digits_input(x)],
        outputs=[triton.InferRequestedOutput("logits")],
        request_id="r1",
        headers=auth(node),
    )
    np.testing.assert_allclose(result.as_numpy("logits"), mlp_forward(tiny_layers, x), rtol=1e-4, atol=1e-4)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("r1", model, "1")


def test_infer_typed_contents(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, node: GrpcNode, tiny_layers: list[DenseLayer]
) -> None:
    x = np.random.default_rng(4).uniform(0, 16, (2, 64)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="digits", id="typed")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(request, metadata=metadata(node))
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("logits", "FP32", [2, 10])
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 10)
    np.testing.assert_allclose(logits, mlp_forward(tiny_layers, x), rtol=1e-4, atol=1e-4)


def test_every_answer_is_its_own_request_s_under_load(node: GrpcNode, tiny_layers: list[DenseLayer]) -> None:
    """32 clients at once, each a distinct input, batched together by the node: each gets its own rows."""
    inputs = np.random.default_rng(5).uniform(0, 16, (96, 1, 64)).astype(np.float32)

    def ask(x: np.ndarray) -> np.ndarray:
        with triton.InferenceServerClient(url=node.grpc_url) as client:
            answer = client.infer("digits", [digits_input(x)], headers=auth(node)).as_numpy("logits")
            assert answer is not None
            return answer

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, inputs))
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(answer, mlp_forward(tiny_layers, x), rtol=1e-4, atol=1e-4)


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()  # type: ignore[no-any-return]


def test_bad_input_is_invalid_argument_and_the_node_serves_on(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, node: GrpcNode
) -> None:
    auth = metadata(node)

    def infer(build: object) -> grpc.StatusCode:
        request = service_pb2.ModelInferRequest(model_name="digits")
        build(request)  # type: ignore[operator]
        return code_of(lambda: stub.ModelInfer(request, metadata=auth))

    def raw(shape: list[int], data: bytes, datatype: str = "FP32") -> object:
        def build(request: service_pb2.ModelInferRequest) -> None:
            request.inputs.add(name="input", datatype=datatype, shape=shape)
            request.raw_input_contents.append(data)

        return build

    nan = np.full((1, 64), np.nan, np.float32).tobytes()
    ones = np.ones((1, 64), np.float32).tobytes()
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert infer(raw([1, 63], ones)) == invalid  # the model's shape
    assert infer(raw([1, 64], ones[:-4])) == invalid  # fewer bytes than the shape
    assert infer(raw([1, 64], nan)) == invalid  # not finite
    assert infer(raw([1, 64], ones, "FP64")) == invalid  # the model's datatype
    assert infer(raw([-1, 64], ones)) == invalid
    assert infer(lambda r: None) == invalid  # no input at all

    def typed_in_the_wrong_field(request: service_pb2.ModelInferRequest) -> None:
        request.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.int_contents.extend(
            [1] * 64
        )

    def raw_and_typed(request: service_pb2.ModelInferRequest) -> None:
        raw([1, 64], ones)(request)
        request.inputs[0].contents.fp32_contents.extend([1.0] * 64)

    def raw_for_one_of_two(request: service_pb2.ModelInferRequest) -> None:
        raw([1, 64], ones)(request)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 64])

    assert infer(typed_in_the_wrong_field) == invalid
    assert infer(raw_and_typed) == invalid
    assert infer(raw_for_one_of_two) == invalid
    request = service_pb2.ModelInferRequest(model_name="digits")
    raw([1, 64], ones)(request)
    request.outputs.add(name="nope")
    assert code_of(lambda: stub.ModelInfer(request, metadata=auth)) == invalid
    request.model_name = "tiny-llm"
    assert code_of(lambda: stub.ModelInfer(request, metadata=auth)) == invalid  # a text model
    request.model_name = "nope"
    assert code_of(lambda: stub.ModelInfer(request, metadata=auth)) == grpc.StatusCode.NOT_FOUND
    request.model_name = "../admin"  # read as the HTTP twin's path is: a dot segment is refused
    assert code_of(lambda: stub.ModelInfer(request, metadata=auth)) == invalid
    request.model_name, request.model_version = "digits", "7"
    assert code_of(lambda: stub.ModelInfer(request, metadata=auth)) == grpc.StatusCode.NOT_FOUND
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=auth).live


def test_a_message_over_the_limit_is_refused_by_size(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, node: GrpcNode
) -> None:
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[300, 64])
    request.raw_input_contents.append(np.ones((300, 64), np.float32).tobytes())  # 76,800 bytes > 65,536
    assert (
        code_of(lambda: stub.ModelInfer(request, metadata=metadata(node)))
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live


def test_credentials_and_model_scopes(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, node: GrpcNode
) -> None:
    keys = KeyStore(node.home / "security" / "keys.sqlite")
    try:
        scoped = keys.create("user", models=("digits-tflite",), tenant="other")[0]
    finally:
        keys.close()
    request = service_pb2.ModelMetadataRequest(name="digits")
    assert code_of(lambda: stub.ModelMetadata(request)) == grpc.StatusCode.UNAUTHENTICATED
    wrong = [("authorization", "Bearer sk_nope_nope")]
    assert code_of(lambda: stub.ModelMetadata(request, metadata=wrong)) == grpc.StatusCode.UNAUTHENTICATED
    own = [("authorization", f"Bearer {scoped}")]
    assert code_of(lambda: stub.ModelMetadata(request, metadata=own)) == grpc.StatusCode.PERMISSION_DENIED
    listed = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(), metadata=own).model_stats
    assert [s.name for s in listed] == ["digits-tflite"]
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live  # public, as /v2/health/live is


def test_calls_are_counted_and_logged_as_requests(
    client: triton.InferenceServerClient, node: GrpcNode
) -> None:
    client.infer("digits", [digits_input(np.ones((1, 64), np.float32))], headers=auth(node))
    scraped = httpx.get(f"{node.url}/metrics", headers=auth(node)).text
    assert 'route="/inference.GRPCInferenceService/ModelInfer"' in scraped
    line = '"path":"/v2/models/digits/infer","status":200'
    until = time.monotonic() + 10  # access lines are written in batches
    while '"rpc":"/inference.GRPCInferenceService/ModelInfer"' not in node.log():
        assert time.monotonic() < until, "no access line for the call"
        time.sleep(0.1)
    assert any(line in entry and '"rpc"' in entry for entry in node.log().splitlines())


def test_a_grpc_port_in_use_stops_the_node_with_a_clear_line(node_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = GrpcNode(node_home)
        node.grpc_port = taken.getsockname()[1]
        node.args = ("--grpc-port", str(node.grpc_port))
        with pytest.raises(RuntimeError, match="node exited"):
            node.start(timeout=30)
    assert f"cannot listen for gRPC on 127.0.0.1:{node.grpc_port}: is grpc_port in use?" in node.log()
