"""Fixtures shared by unit and end-to-end tests: tiny models the tests make themselves."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from edgegen.executors import describe_model
from edgegen.modelkit.layers import DenseLayer
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.modelkit.tflite_writer import mlp_to_tflite
from edgegen.store import ModelStore


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
