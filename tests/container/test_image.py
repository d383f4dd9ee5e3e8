"""The image as it ships (deploy/docker/Dockerfile), run under podman the way deploy/compose.yaml runs it:
it becomes healthy and ready from a home whose store is filled, answers `/predict` and a streamed chat to a
key made with its own CLI, runs as an unprivileged user on a read-only root, and drains on SIGTERM."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgegen.modelkit.layers import DenseLayer, mlp_forward
from tests.container.podman import UID, NodeContainer, copy_home
from tests.e2e.node_process import free_port

pytestmark = pytest.mark.container
PIXELS = np.random.default_rng(0).integers(0, 17, (64,)).astype(float).tolist()
# Greedy, and a prompt that keeps a 135M model talking: the stream is still running when SIGTERM comes.
COUNTING = {
    "model": "smollm2-135m",
    "messages": [{"role": "user", "content": "Count from 1 to 100, one number per line."}],
    "temperature": 0,
    "stream": True,
}


@pytest.fixture(scope="module")
def node(models_home: Path) -> Iterator[NodeContainer]:
    container = NodeContainer(f"edgegen-test-node-{os.getpid()}", models_home, free_port())
    try:
        # podman run → every model loaded (issue 16's target: 3 s), shown with -s.
        print(f"container start to ready: {container.start().wait_ready():.2f} s")
        container.wait_healthy()
        yield container
    finally:
        container.remove()


@pytest.fixture(scope="module")
def key(node: NodeContainer) -> dict[str, str]:
    return {"Authorization": f"Bearer {node.create_key()}"}


def chat_events(response: httpx.Response) -> Iterator[dict[str, Any] | str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


def test_it_runs_unprivileged_on_a_read_only_root(node: NodeContainer) -> None:
    status = node.exec("cat", "/proc/1/status").stdout  # the server itself: the entrypoint exec'd it
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [str(UID)] * 4
    assert node.exec("id", "-u").stdout.strip() == str(UID)
    assert "serve" in node.exec("cat", "/proc/1/cmdline").stdout.split("\0")
    # Not even root in the container can write outside the volume and /tmp.
    refused = node.exec("touch", "/opt/edgegen/probe", user="0", check=False)
    assert refused.returncode != 0
    assert "Read-only file system" in refused.stderr
    node.exec("touch", "/var/lib/edgegen/probe", "/tmp/probe")


def test_predict_answers_a_key_only(
    node: NodeContainer, key: dict[str, str], tiny_layers: list[DenseLayer]
) -> None:
    expected = mlp_forward(tiny_layers, np.array([PIXELS], dtype=np.float32))
    assert httpx.post(f"{node.url}/predict", json={"input_data": PIXELS}).status_code == 401
    for path in ("/predict", "/models/digits-tflite/predict"):  # ONNX Runtime and LiteRT in the image
        answer = httpx.post(f"{node.url}{path}", json={"input_data": PIXELS}, headers=key)
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["prediction"], expected, rtol=1e-4, atol=1e-4)


def test_a_streamed_chat(node: NodeContainer, key: dict[str, str]) -> None:
    body = {**COUNTING, "max_tokens": 12}
    url = f"{node.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=key, timeout=60) as response:
        assert response.status_code == 200
        events = list(chat_events(response))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_sigterm_lets_a_stream_finish_then_exits_cleanly(models_home: Path, tmp_path: Path) -> None:
    copy_home(models_home, tmp_path)
    container = NodeContainer(f"edgegen-test-drain-{os.getpid()}", tmp_path, free_port())
    try:
        container.start().wait_ready()
        headers = {"Authorization": f"Bearer {container.create_key()}"}
        events: list[tuple[float, dict[str, Any] | str]] = []
        first = threading.Event()

        def stream() -> None:
            body = {**COUNTING, "max_tokens": 48}
            url = f"{container.url}/v1/chat/completions"
            with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as response:
                for event in chat_events(response):
                    events.append((time.monotonic(), event))
                    first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60)
        container.kill("TERM")  # what `podman stop` and `docker stop` send first (the image's STOPSIGNAL)
        signalled = time.monotonic()
        reader.join(120)
        assert container.wait_exit() == 0
        assert events[-1][1] == "[DONE]"
        assert any(at > signalled for at, _ in events)  # it went on streaming after SIGTERM
        assert "Application shutdown complete" in container.logs()
    finally:
        container.remove()
