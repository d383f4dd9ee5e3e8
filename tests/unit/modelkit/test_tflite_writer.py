import itertools
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import tflite
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from edgegen.modelkit.layers import Activation, DenseLayer, check_chain, mlp_forward
from edgegen.modelkit.tflite_writer import mlp_to_tflite

DIMS = (64, 32, 16, 10)
ACTIVATIONS: tuple[Activation, ...] = ("relu", "relu", "none")
# AUTO applies the XNNPACK delegate; the other runs TFLite's own builtin kernels.
RESOLVERS = [OpResolverType.AUTO, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES]


def make_mlp(
    dims: Sequence[int] = DIMS, activations: Sequence[Activation] = ACTIVATIONS, seed: int = 0
) -> list[DenseLayer]:
    rng = np.random.default_rng(seed)
    return [
        DenseLayer(
            weight=(rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32),
            bias=(0.1 * rng.standard_normal(n_out)).astype(np.float32),
            activation=act,
        )
        for (n_in, n_out), act in zip(itertools.pairwise(dims), activations, strict=True)
    ]


def run_interpreter(interpreter: Interpreter, x: np.ndarray) -> np.ndarray:
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def test_mlp_forward_by_hand() -> None:
    layers = [
        DenseLayer(np.array([[1, -1], [2, 0]], np.float32), np.array([0, -1], np.float32), "relu"),
        DenseLayer(np.array([[1, 1]], np.float32), np.array([0.5], np.float32)),
    ]
    x = np.array([[1, 2], [3, 1]], np.float32)
    # Row 0: hidden [-1, 1] -> relu [0, 1] -> 1.5. Row 1: hidden [2, 5] -> 7.5.
    y = mlp_forward(layers, x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [[1.5], [7.5]])


def test_mlp_forward_rejects_wrong_input_width() -> None:
    with pytest.raises(ValueError, match=r"input must have shape \(batch, 64\), got \(2, 63\)"):
        mlp_forward(make_mlp(), np.zeros((2, 63), np.float32))


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_export_matches_reference_at_batch_1_and_5(resolver: OpResolverType) -> None:
    layers = make_mlp()
    interpreter = Interpreter(model_content=mlp_to_tflite(layers), experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(1)

    x1 = rng.standard_normal((1, DIMS[0])).astype(np.float32)
    y1 = run_interpreter(interpreter, x1)
    assert y1.shape == (1, DIMS[-1])
    assert np.abs(y1 - mlp_forward(layers, x1)).max() < 1e-5

    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [5, DIMS[0]])
    interpreter.allocate_tensors()
    x5 = rng.standard_normal((5, DIMS[0])).astype(np.float32)
    y5 = run_interpreter(interpreter, x5)
    assert y5.shape == (5, DIMS[-1])
    assert np.abs(y5 - mlp_forward(layers, x5)).max() < 1e-5


def test_single_layer_export() -> None:
    layers = make_mlp((8, 3), ("relu",), seed=2)
    interpreter = Interpreter(model_content=mlp_to_tflite(layers))
    interpreter.allocate_tensors()
    x = np.random.default_rng(3).standard_normal((1, 8)).astype(np.float32)
    assert np.abs(run_interpreter(interpreter, x) - mlp_forward(layers, x)).max() < 1e-5


def test_input_and_output_details() -> None:
    interpreter = Interpreter(
        model_content=mlp_to_tflite(make_mlp(), input_name="features", output_name="out")
    )
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert inp["name"] == "features"
    assert out["name"] == "out"
    assert inp["dtype"] == np.float32
    assert out["dtype"] == np.float32
    assert inp["shape"].tolist() == [1, DIMS[0]]
    assert inp["shape_signature"].tolist() == [-1, DIMS[0]]
    assert out["shape"].tolist() == [1, DIMS[-1]]
    assert out["shape_signature"].tolist() == [-1, DIMS[-1]]


def test_signature_runner() -> None:
    layers = make_mlp()
    interpreter = Interpreter(model_content=mlp_to_tflite(layers))
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["input"], "outputs": ["logits"]}
    }
    x = np.random.default_rng(4).standard_normal((3, DIMS[0])).astype(np.float32)
    result = interpreter.get_signature_runner("serving_default")(input=x)
    assert set(result) == {"logits"}
    assert np.abs(result["logits"] - mlp_forward(layers, x)).max() < 1e-5


def test_file_layout() -> None:
    layers = make_mlp()
    data = mlp_to_tflite(layers, description="unit test")
    assert data[4:8] == b"TFL3"
    model = tflite.Model.GetRootAs(data, 0)
    assert model.Version() == 3
    assert model.Description() == b"unit test"
    assert model.SubgraphsLength() == 1
    assert model.Subgraphs(0).OperatorsLength() == len(layers)
    assert model.OperatorCodes(0).BuiltinCode() == tflite.BuiltinOperator.FULLY_CONNECTED
    assert model.BuffersLength() == 1 + 2 * len(layers)
    assert model.Buffers(0).DataLength() == 0  # the empty sentinel
    for i, layer in enumerate(layers):
        for buf_idx, array in ((1 + 2 * i, layer.weight), (2 + 2 * i, layer.bias)):
            buf = model.Buffers(buf_idx)
            start = buf._tab.Vector(buf._tab.Offset(4))  # absolute file offset of the data bytes
            assert start % 16 == 0
            assert data[start : start + array.nbytes] == array.tobytes()


def _w(n_out: int, n_in: int, dtype: type = np.float32) -> np.ndarray:
    return np.zeros((n_out, n_in), dtype)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DenseLayer(_w(4, 3, np.float64), np.zeros(4, np.float32)), "must be float32, got float64"),
        (lambda: DenseLayer(np.zeros(4, np.float32), np.zeros(4, np.float32)), "weight must be 2-D"),
        (
            lambda: DenseLayer(_w(4, 3), np.zeros(3, np.float32)),
            r"bias must have shape .* \(4,\), got \(3,\)",
        ),
        (lambda: DenseLayer(_w(4, 3), np.zeros(4, np.float32), "gelu"), "activation must be one of"),
        (lambda: DenseLayer([[1.0]], np.zeros(1, np.float32)), "must be numpy arrays"),
    ],
)
def test_bad_layer_raises(build: Callable[[], DenseLayer], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_mismatched_chain_raises() -> None:
    layers = [
        DenseLayer(_w(32, 64), np.zeros(32, np.float32)),
        DenseLayer(_w(10, 16), np.zeros(10, np.float32)),
    ]
    expected = "layer 0 outputs 32 features but layer 1 expects 16"
    with pytest.raises(ValueError, match=expected):
        check_chain(layers)
    with pytest.raises(ValueError, match=expected):
        mlp_to_tflite(layers)


def test_export_rejects_empty_and_clashing_names() -> None:
    with pytest.raises(ValueError, match="at least one DenseLayer"):
        mlp_to_tflite([])
    with pytest.raises(ValueError, match="distinct non-empty"):
        mlp_to_tflite(make_mlp(), input_name="x", output_name="x")
