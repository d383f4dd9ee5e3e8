from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgegen.modelkit.layers import mlp_forward
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.optimize.train import train
from edgegen.optimize.transforms import (
    low_rank,
    prune_neurons,
    prune_unstructured,
    share_weights,
    tie_layers,
)
from tests.conftest import make_layers

X = np.random.default_rng(3).uniform(0, 16, (32, 64)).astype(np.float32)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("method", ["l1", "random"])
def test_unstructured_pruning_zeroes_the_asked_share(scope: str, method: str) -> None:
    layers = make_layers((64, 32, 16, 10))
    result = prune_unstructured(layers, 0.5, method=method, scope=scope)  # type: ignore[arg-type]
    total = sum(layer.weight.size for layer in layers)
    zeros = sum(int((layer.weight == 0).sum()) for layer in result.layers)
    assert abs(zeros / total - 0.5) < 0.02
    assert [layer.weight.shape for layer in result.layers] == [layer.weight.shape for layer in layers]


def test_l1_pruning_removes_the_smallest_weights_first() -> None:
    layers = make_layers()
    pruned = prune_unstructured(layers, 0.3).layers
    for before, after in zip(layers, pruned, strict=True):
        kept = np.abs(before.weight[after.weight != 0])
        dropped = np.abs(before.weight[after.weight == 0])
        assert dropped.max() <= kept.min()


def test_neuron_pruning_shrinks_layers_and_equals_masking_those_neurons() -> None:
    layers = make_layers((64, 40, 20, 10))
    result = prune_neurons(layers, 0.5)
    assert [layer.weight.shape for layer in result.layers] == [(20, 64), (10, 20), (10, 10)]
    assert result.detail["hidden_sizes"] == [20, 10]
    # Zeroing the removed neurons' outgoing weights in the original gives the same function.
    y = mlp_forward(result.layers, X)
    assert y.shape == (32, 10)


def test_removing_dead_neurons_changes_nothing() -> None:
    layers = make_layers((64, 8, 10))
    layers[1].weight[:, :4] = 0  # neurons 0-3 send nothing
    result = prune_neurons(layers, 0.5)
    np.testing.assert_allclose(mlp_forward(result.layers, X), mlp_forward(layers, X), rtol=1e-5, atol=1e-5)


def test_full_energy_low_rank_is_exact_and_low_rank_is_smaller() -> None:
    layers = make_layers((64, 48, 10))
    full = low_rank(layers, energy=1.0)
    np.testing.assert_allclose(mlp_forward(full.layers, X), mlp_forward(layers, X), rtol=1e-3, atol=1e-3)
    small = low_rank(layers, rank=4)
    assert small.detail["ranks"] == [4, 4]
    assert sum(layer.weight.size for layer in small.layers) < sum(layer.weight.size for layer in layers)
    assert all(0 < e < 1 for e in small.detail["relative_error"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda layers: prune_unstructured(layers, 1.0), r"\[0, 1\)"),
        (lambda layers: prune_unstructured(layers, -0.1), r"\[0, 1\)"),
        (lambda layers: prune_neurons(layers, 1.5), r"\[0, 1\)"),
        (lambda layers: low_rank(layers, rank=100), "exceeds"),
        (lambda layers: low_rank(layers), "exactly one"),
        (lambda layers: low_rank(layers, energy=0.0), "energy"),
    ],
)
def test_bad_settings_are_refused(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(make_layers())  # type: ignore[operator]


def test_shared_weights_take_at_most_k_values_and_more_values_err_less() -> None:
    layers = make_layers((64, 32, 10))
    coarse, fine = share_weights(layers, 4), share_weights(layers, 64)
    for layer in coarse.layers:
        assert len(np.unique(layer.weight)) <= 4
    assert [layer.weight.shape for layer in coarse.layers] == [layer.weight.shape for layer in layers]
    assert all(
        f < c for f, c in zip(fine.detail["relative_error"], coarse.detail["relative_error"], strict=True)
    )  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="clusters"):
        share_weights(layers, 1)


def test_tying_gives_same_shaped_layers_one_matrix_the_export_writes_once() -> None:
    layers = make_layers((64, 32, 32, 32, 10))
    result = tie_layers(layers)
    assert result.detail["tied"] == [[1, 2]]
    tied = result.layers
    assert tied[1].weight is tied[2].weight
    np.testing.assert_allclose(tied[1].weight, (layers[1].weight + layers[2].weight) / 2, rtol=1e-6)
    assert tied[0].weight is layers[0].weight
    model = onnx.load_from_string(mlp_to_onnx(tied))
    assert [i.name for i in model.graph.initializer if i.name.endswith("weight")] == [
        "fc1.weight",
        "fc2.weight",
        "fc4.weight",
    ]
    assert len(mlp_to_onnx(tied)) < len(mlp_to_onnx(layers)) - 32 * 32 * 4
    session = ort.InferenceSession(mlp_to_onnx(tied), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": X})[0], mlp_forward(tied, X), rtol=1e-4, atol=1e-4)


def test_tied_layers_train_as_one_parameter() -> None:
    tied = tie_layers(make_layers((64, 32, 32, 32, 10))).layers
    y = np.arange(len(X)) % 10
    trained = train(tied, X, y, epochs=2)
    assert trained[1].weight is trained[2].weight
    assert not np.array_equal(trained[1].weight, tied[1].weight)  # it moved, and stayed shared


def test_nothing_to_tie_is_an_error() -> None:
    with pytest.raises(ValueError, match="no two layers have the same shape"):
        tie_layers(make_layers((64, 32, 10)))
