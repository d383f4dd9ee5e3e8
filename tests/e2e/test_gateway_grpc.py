"""KServe v2 over gRPC at a gateway: `tritonclient.grpc` against the gateway's gRPC port, relayed over HTTP
to two real nodes that have no gRPC port of their own, with the gateway's balancer, gate and limits."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from edgegen.modelkit.layers import DenseLayer, mlp_forward
from tests.e2e.node_process import GatewayProcess, NodeProcess, free_port, worker_processes
from tests.e2e.test_gateway import gateway_config, running_fleet

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]
) -> Iterator[list[NodeProcess]]:
    with running_fleet(tmp_path_factory.mktemp("grpc-fleet"), model_files, n=2) as nodes:
        yield nodes


@contextlib.contextmanager
def grpc_gateway(root: Path, fleet: list[NodeProcess], *flags: str) -> Iterator[GatewayProcess]:
    """A gateway with a gRPC port (its `grpc_url`), authentication on; always stopped."""
    config = gateway_config(root / "gateway.toml", fleet)
    port = free_port()
    process = GatewayProcess(root, "--config", str(config), "--grpc-port", str(port), *flags, auth=True)
    process.grpc_url = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fleet: list[NodeProcess]) -> Iterator[GatewayProcess]:
    with grpc_gateway(tmp_path_factory.mktemp("grpc-gateway"), fleet) as process:
        yield process


@pytest.fixture(scope="module")
def two_workers(
    tmp_path_factory: pytest.TempPathFactory, fleet: list[NodeProcess]
) -> Iterator[GatewayProcess]:
    """`--workers 2`: both processes serve gRPC on one port (grpcio's SO_REUSEPORT), the kernel spreading
    connections over them as it does the HTTP port's."""
    with grpc_gateway(tmp_path_factory.mktemp("grpc-gateway-workers"), fleet, "--workers", "2") as process:
        yield process


def url(gateway: GatewayProcess) -> str:
    return gateway.grpc_url  # type: ignore[attr-defined,no-any-return]


def auth(gateway: GatewayProcess) -> dict[str, str]:
    return {"authorization": f"Bearer {gateway.admin_key}"}


def digits_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def assert_answers(
    gateway: GatewayProcess,
    inputs: np.ndarray,
    tiny_layers: list[DenseLayer],
    threads: int,
    request_id: str = "",
) -> None:
    """Each input inferred over a connection of its own, `threads` at a time: every answer the model's own
    for that input, under its request id."""

    def ask(x: np.ndarray) -> np.ndarray:
        with triton.InferenceServerClient(url(gateway)) as client:
            result = client.infer("digits", [digits_input(x)], headers=auth(gateway), request_id=request_id)
            assert result.get_response().id == request_id
            answer = result.as_numpy("logits")
            assert answer is not None
            return answer

    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(ask, inputs))
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(answer, mlp_forward(tiny_layers, x), rtol=1e-4, atol=1e-4)


def inferences(node: NodeProcess) -> int:
    stats = httpx.get(f"{node.url}/v2/models/digits/stats").json()["model_stats"][0]
    return int(stats["inference_count"])


def test_health_metadata_config_and_statistics(gateway: GatewayProcess) -> None:
    with triton.InferenceServerClient(url(gateway)) as client:
        headers = auth(gateway)
        assert client.is_server_live(headers=headers)
        assert client.is_server_ready(headers=headers)
        assert client.is_model_ready("digits", headers=headers)
        assert not client.is_model_ready("nope", headers=headers)
        assert "statistics" in client.get_server_metadata(headers=headers, as_json=True)["extensions"]
        meta = client.get_model_metadata("digits", headers=headers, as_json=True)
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
        config = client.get_model_config("digits", headers=headers, as_json=True)["config"]
        assert (config["max_batch_size"], config["platform"]) == (32, "onnxruntime_onnx")
        (stat,) = client.get_inference_statistics("digits", headers=headers, as_json=True)["model_stats"]
        assert stat["name"] == "digits"


def test_inferences_are_right_and_spread_over_the_nodes(
    gateway: GatewayProcess, fleet: list[NodeProcess], tiny_layers: list[DenseLayer]
) -> None:
    before = [inferences(node) for node in fleet]
    inputs = np.random.default_rng(11).uniform(0, 16, (48, 1, 64)).astype(np.float32)
    assert_answers(gateway, inputs, tiny_layers, threads=16, request_id="g1")
    added = [inferences(node) - b for node, b in zip(fleet, before, strict=True)]
    assert sum(added) == len(inputs)
    assert all(a > 0 for a in added), added


def test_two_workers_both_serve_grpc_and_answer_right(
    two_workers: GatewayProcess, fleet: list[NodeProcess], tiny_layers: list[DenseLayer]
) -> None:
    workers = worker_processes(two_workers)
    port = int(url(two_workers).rsplit(":", 1)[1])

    def listening() -> set[int]:
        return {
            w.pid
            for w in workers
            for c in w.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }

    deadline = time.monotonic() + 30  # (a worker may still be starting: the gateway answered from one)
    while len(listening()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(workers) == len(listening()) == 2
    inputs = np.random.default_rng(12).uniform(0, 16, (32, 1, 64)).astype(np.float32)
    assert_answers(two_workers, inputs, tiny_layers, threads=8)


def test_typed_contents_are_relayed(gateway: GatewayProcess, tiny_layers: list[DenseLayer]) -> None:
    x = np.random.default_rng(12).uniform(0, 16, (2, 64)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 64]).contents.fp32_contents.extend(x.ravel())
    request.outputs.add(name="logits")
    with grpc.insecure_channel(url(gateway)) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=list(auth(gateway).items())
        )
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 10)
    np.testing.assert_allclose(logits, mlp_forward(tiny_layers, x), rtol=1e-4, atol=1e-4)


def test_refusals_keep_their_codes(gateway: GatewayProcess) -> None:
    with triton.InferenceServerClient(url(gateway)) as client:
        bad = triton.InferInput("input", [1, 63], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
        for call, code in (
            (lambda: client.infer("digits", [bad], headers=auth(gateway)), "INVALID_ARGUMENT"),
            (lambda: client.get_model_metadata("nope", headers=auth(gateway)), "NOT_FOUND"),
            (lambda: client.get_model_metadata("digits"), "UNAUTHENTICATED"),
            (lambda: client.get_model_config("tiny-llm", headers=auth(gateway)), "INVALID_ARGUMENT"),
        ):
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert caught.value.status() == f"StatusCode.{code}"
        assert client.is_server_live(headers=auth(gateway))
