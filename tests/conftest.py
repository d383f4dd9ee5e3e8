"""Fixtures shared by unit and end-to-end tests: tiny models the tests make themselves."""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgegen.executors import describe_model
from edgegen.modelkit.layers import DenseLayer
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.modelkit.tflite_writer import mlp_to_tflite
from edgegen.store import ModelStore
from tests.e2e.node_process import free_port


def make_layers(sizes: tuple[int, ...] = (64, 32, 10), seed: int = 0) -> list[DenseLayer]:
    rng = np.random.default_rng(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(
            DenseLayer(
                weight=(rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32),
                bias=rng.standard_normal(n_out).astype(np.float32) * np.float32(0.1),
                activation="relu" if i < len(sizes) - 2 else "none",
            )
        )
    return layers


@pytest.fixture(scope="session")
def tiny_layers() -> list[DenseLayer]:
    return make_layers()


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory, tiny_layers: list[DenseLayer]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    onnx_path, tflite_path = root / "tiny.onnx", root / "tiny.tflite"
    onnx_path.write_bytes(mlp_to_onnx(tiny_layers))
    tflite_path.write_bytes(mlp_to_tflite(tiny_layers))
    return {"onnx": onnx_path, "tflite": tflite_path}


def fill_store(root: Path, model_files: dict[str, Path]) -> ModelStore:
    store = ModelStore(root, describe=describe_model)
    store.add(model_files["onnx"], "digits")
    store.add(model_files["tflite"], "digits-tflite")
    return store


@pytest.fixture
def store(tmp_path: Path, model_files: dict[str, Path]) -> ModelStore:
    return fill_store(tmp_path / "models", model_files)


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's package, installed by `make test`) on a free loopback port, for the
    session, persisting with an append-only file as a deployment would."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is missing: `make test` installs Debian's redis-server package")
    port, data = free_port(), tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
         "--appendfsync", "everysec", "--dir", str(data), "--logfile", str(data / "log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        until = time.monotonic() + 10
        while not ping(port):
            assert process.poll() is None, (data / "log").read_text()
            assert time.monotonic() < until, "redis-server did not answer"
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)
