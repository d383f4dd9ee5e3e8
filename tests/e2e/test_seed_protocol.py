"""The seed protocol against a real `edgegen serve`: curl, many concurrent clients, hostile bytes."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgegen.executors import load_executor
from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e


def expected_outputs(model_files: dict[str, Path], fmt: str, inputs: np.ndarray) -> np.ndarray:
    """What the model gives for each input alone, computed in this process."""
    executor = load_executor(model_files[fmt], fmt)
    try:
        return np.concatenate([executor.run({"input": x[None]})["logits"] for x in inputs])
    finally:
        executor.close()


def test_the_readme_curl_command_answers_a_prediction(
    node: NodeProcess, model_files: dict[str, Path]
) -> None:
    pixels = [
        0,
        0,
        5,
        13,
        9,
        1,
        0,
        0,
        0,
        0,
        13,
        15,
        10,
        15,
        5,
        0,
        0,
        3,
        15,
        2,
        0,
        11,
        8,
        0,
        0,
        4,
        12,
        0,
        0,
        8,
        8,
        0,
    ]
    pixels += [
        0,
        5,
        8,
        0,
        0,
        9,
        8,
        0,
        0,
        4,
        11,
        0,
        1,
        12,
        7,
        0,
        0,
        2,
        14,
        5,
        10,
        12,
        0,
        0,
        0,
        0,
        6,
        13,
        10,
        0,
        0,
        0,
    ]
    result = subprocess.run(
        ["curl", "-s", "-X", "POST", "-H", "Content-Type: application/json",
         "-d", json.dumps({"input_data": pixels}), f"{node.url}/predict"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    prediction = np.array(json.loads(result.stdout)["prediction"], dtype=np.float32)
    want = expected_outputs(model_files, "onnx", np.array([pixels], np.float32))
    np.testing.assert_array_equal(prediction, want)


@pytest.mark.parametrize(("path", "fmt"), [("/predict", "onnx"), ("/models/digits-tflite/predict", "tflite")])
def test_every_answer_under_64_concurrent_clients_is_that_requests_own(
    node: NodeProcess, model_files: dict[str, Path], path: str, fmt: str
) -> None:
    """The seed's app returns other requests' predictions under load; ours must not, ever."""
    inputs = np.random.default_rng(42).uniform(0, 16, (2000, 64)).astype(np.float32)
    want = expected_outputs(model_files, fmt, inputs)

    async def run() -> list[np.ndarray]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=node.url, limits=limits, timeout=60) as client:
            gate = asyncio.Semaphore(64)

            async def one(x: np.ndarray) -> np.ndarray:
                async with gate:
                    response = await client.post(path, json={"input_data": x.tolist()})
                assert response.status_code == 200, response.text
                return np.array(response.json()["prediction"], dtype=np.float32)

            return await asyncio.gather(*(one(x) for x in inputs))

    got = asyncio.run(run())
    wrong = [i for i, answer in enumerate(got) if not np.array_equal(answer, want[i : i + 1])]
    assert wrong == [], f"{len(wrong)} of {len(inputs)} answers differ from the model's own output"


def raw_request(node: NodeProcess, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", node.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b'"}' in chunks[-1]:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{", 413),
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 400),
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"a" * (1 << 20)
            + b"\r\nContent-Length: 2\r\n\r\n{}",
            431,
        ),
    ],
)
def test_hostile_requests_are_refused_and_the_node_keeps_serving(
    node: NodeProcess, request_bytes: bytes, status: int
) -> None:
    assert status_of(raw_request(node, request_bytes)) == status
    assert httpx.post(f"{node.url}/predict", json={"input_data": [1] * 64}).status_code == 200


def test_chunked_body_over_8_mib_is_413_without_reading_it_all(node: NodeProcess) -> None:
    def body():
        yield b'{"input_data": ['
        for _ in range(10_000):
            yield b"1," * 500  # 10 MB in all, never announced
        yield b"1]}"

    with httpx.Client(timeout=30) as client:
        try:
            response = client.post(f"{node.url}/predict", content=body())
            assert response.status_code == 413
        except httpx.WriteError:
            pass  # the node answered 413 and closed while we were still sending
    assert httpx.post(f"{node.url}/predict", json={"input_data": [1] * 64}).status_code == 200


def test_json_nested_100000_levels_is_400(node: NodeProcess) -> None:
    response = httpx.post(f"{node.url}/predict", content=b"[" * 100_000 + b"]" * 100_000)
    assert response.status_code == 400
    assert response.json()["error"].startswith("the request body is not valid JSON")
    assert node.alive()


def test_logs_are_json_lines_with_the_request_id(node: NodeProcess) -> None:
    httpx.post(f"{node.url}/predict", json={"input_data": [1] * 64}, headers={"X-Request-ID": "trace-me-42"})
    until = time.monotonic() + 5  # access lines are written in batches, every 0.2 s
    while time.monotonic() < until:
        lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
        access = [line for line in lines if line.get("request_id") == "trace-me-42"]
        if access:
            break
        time.sleep(0.05)
    assert access
    assert access[-1]["path"] == "/predict"
    assert access[-1]["status"] == 200


def test_activating_a_version_from_the_cli_reaches_the_running_node(
    node: NodeProcess, model_files: dict[str, Path]
) -> None:
    cli = [sys.executable, "-m", "edgegen", "models"]
    subprocess.run(
        [*cli, "add", str(model_files["onnx"]), "--name", "digits", "--version", "7"],
        env=node.env,
        check=True,
    )
    subprocess.run([*cli, "activate", "digits", "7"], env=node.env, check=True)
    infer = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}
    until = time.monotonic() + 10
    while time.monotonic() < until:
        if httpx.post(f"{node.url}/v2/models/digits/infer", json=infer).json()["model_version"] == "7":
            return
        time.sleep(0.1)
    raise AssertionError("the node did not pick up the activated version")
