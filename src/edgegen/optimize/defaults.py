"""Build the node's default classifier locally: `digits` (ONNX) and `digits-tflite` (LiteRT)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgegen.optimize import digits
from edgegen.optimize.layers import mlp_forward
from edgegen.optimize.onnx_export import mlp_to_onnx
from edgegen.optimize.tflite_export import mlp_to_tflite
from edgegen.store import ModelStore


@dataclass(frozen=True)
class BuiltModel:
    name: str
    version: str
    test_accuracy: float


def build_digits(store: ModelStore, *, epochs: int = 40, seed: int = 0) -> list[BuiltModel]:
    """Train the seed's student MLP on the bundled digits and add it to the store in both formats."""
    split = digits.load_split(seed=seed)
    torch.manual_seed(seed)
    model = digits.MLP(digits.STUDENT_HIDDEN)
    torch_accuracy = digits.train(model, split, epochs=epochs, seed=seed)
    layers = digits.to_layers(model)
    # Score the exported weights themselves: the accuracy a client of the node will see.
    predicted = mlp_forward(layers, split.x_test).argmax(1)
    accuracy = float((predicted == split.y_test).mean())
    metadata: dict[str, object] = {
        "dataset": "sklearn.datasets.load_digits, stratified 80/20 split, seed 0",
        "architecture": f"64-{digits.STUDENT_HIDDEN}-{digits.STUDENT_HIDDEN}-10 MLP (the seed's student)",
        "input": "64 grey levels 0-16 (an 8x8 image flattened row by row, as load_digits gives it)",
        "output": "10 logits, one per digit",
        "test_accuracy": round(accuracy, 4),
        "torch_test_accuracy": round(torch_accuracy, 4),
        "epochs": epochs,
    }
    built = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, file, data in (
            ("digits", "digits.onnx", mlp_to_onnx(layers, doc="seed student MLP on sklearn digits")),
            ("digits-tflite", "digits.tflite", mlp_to_tflite(layers, description="seed student MLP")),
        ):
            path = Path(tmp) / file
            path.write_bytes(data)
            manifest = store.add(path, name, metadata=metadata, activate=True)
            built.append(BuiltModel(name, manifest.version, accuracy))
    return built


def sample_inputs(count: int, seed: int = 0) -> np.ndarray:
    """Test-split images (count, 64) float32, for examples, smoke tests and benchmarks."""
    split = digits.load_split(seed=seed)
    return split.x_test[:count]
