"""Quantization-aware training computes, while it trains, what ONNX Runtime's int8 model computes after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edgegen.modelkit.layers import mlp_forward
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.optimize.quantize import quantize
from edgegen.optimize.train import QatLinear, to_torch, train
from tests.conftest import make_layers

RNG = np.random.default_rng(5)
X = RNG.uniform(0, 16, (512, 64)).astype(np.float32)


def _int8(x: np.ndarray, scale: float, zero_point: int, low: int, high: int) -> np.ndarray:
    return (np.clip(np.round(x / scale) + zero_point, low, high) - zero_point) * scale


def test_a_qat_linear_rounds_as_onnx_runtime_static_qdq_does() -> None:
    linear = QatLinear(64, 8).eval()
    linear.inputs.low.fill_(0.0)
    linear.inputs.high.fill_(16.0)
    linear.outputs.low.fill_(-20.0)
    linear.outputs.high.fill_(30.0)
    with torch.no_grad():
        got = linear(torch.from_numpy(X[:16])).numpy()
    w, b = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    x = _int8(X[:16], 16 / 255, -128, -128, 127)  # activations: asymmetric int8 over [low, high]
    w = _int8(w, float(np.abs(w).max()) / 127, 0, -127, 127)  # weights: symmetric, per tensor
    out_scale = 50 / 255
    expected = _int8(x @ w.T + b, out_scale, round(-128 + 20 / out_scale), -128, 127)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_training_through_rounding_tracks_ranges_and_learns() -> None:
    layers = make_layers((64, 32, 10))
    y = (X[:, :32].sum(1) > X[:, 32:].sum(1)).astype(np.int64)
    model = to_torch(layers, fake_quant=True).train()
    with torch.no_grad():
        model(torch.from_numpy(X))
    first = next(m for m in model if isinstance(m, QatLinear))
    assert float(first.inputs.low) == 0.0  # zero is always representable
    assert float(first.inputs.high) == float(X.max())
    qat = train(layers, X, y, epochs=30, fake_quant=True)
    plain = train(layers, X, y, epochs=30)
    accuracy = (mlp_forward(qat, X).argmax(1) == y).mean()
    assert accuracy > 0.8  # from chance (0.5)
    assert accuracy >= (mlp_forward(plain, X).argmax(1) == y).mean() - 0.05


def test_a_qat_model_survives_onnx_runtime_int8(tmp_path: Path) -> None:
    layers = make_layers((64, 32, 10))
    y = mlp_forward(layers, X).argmax(1)
    qat = train(layers, X, y, epochs=3, fake_quant=True)
    source, target = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    source.write_bytes(mlp_to_onnx(qat))
    quantize(source, target, "static", calibration=X)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    int8 = session.run(None, {"input": X})[0]
    exact = mlp_forward(qat, X)
    assert (int8.argmax(1) == exact.argmax(1)).mean() > 0.97


def test_qat_weights_come_back_as_plain_float_layers() -> None:
    layers = make_layers((64, 16, 10))
    y = mlp_forward(layers, X).argmax(1)
    qat = train(layers, X, y, epochs=1, fake_quant=True)
    assert [(q.weight.shape, q.activation) for q in qat] == [(w.weight.shape, w.activation) for w in layers]
    assert all(q.weight.dtype == np.float32 for q in qat)
    assert not all(np.array_equal(q.weight, w.weight) for q, w in zip(qat, layers, strict=True))
