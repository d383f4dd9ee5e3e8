"""Our protobuf encoding of an MLP against the `onnx` package's own, and against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgegen.modelkit.layers import DenseLayer, mlp_forward
from edgegen.modelkit.onnx_writer import IR_VERSION, OPSET, mlp_to_onnx


def layers_with_a_tied_pair() -> list[DenseLayer]:
    rng = np.random.default_rng(3)
    shared = rng.standard_normal((16, 16)).astype(np.float32)
    return [
        DenseLayer(rng.standard_normal((16, 8)).astype(np.float32), np.zeros(16, np.float32), "relu"),
        DenseLayer(shared, rng.standard_normal(16).astype(np.float32), "relu"),
        DenseLayer(shared, rng.standard_normal(16).astype(np.float32), "relu"),
        DenseLayer(
            rng.standard_normal((300, 16)).astype(np.float32), rng.standard_normal(300).astype(np.float32)
        ),
    ]


def built_with_onnx_helper(layers: list[DenseLayer], doc: str) -> bytes:
    """The same graph through onnx.helper, the reference our encoder must match byte for byte."""
    nodes, initializers, current, written = [], [], "input", {}
    for i, layer in enumerate(layers, start=1):
        w = written.setdefault(id(layer.weight), f"fc{i}.weight")
        if w == f"fc{i}.weight":
            initializers.append(numpy_helper.from_array(layer.weight, w))
        initializers.append(numpy_helper.from_array(layer.bias, f"fc{i}.bias"))
        last = i == len(layers)
        out = "logits" if last and layer.activation == "none" else f"fc{i}.out"
        nodes.append(helper.make_node("Gemm", [current, w, f"fc{i}.bias"], [out], name=f"fc{i}", transB=1))
        current = out
        if layer.activation == "relu":
            relu_out = "logits" if last else f"relu{i}.out"
            nodes.append(helper.make_node("Relu", [current], [relu_out], name=f"relu{i}"))
            current = relu_out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", layers[0].in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", layers[-1].out_features])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgegen", doc_string=doc
    )
    model.ir_version = IR_VERSION
    return model.SerializeToString()


@pytest.mark.parametrize("doc", ["", "seed student MLP"])
def test_the_bytes_are_the_onnx_packages_own(doc: str) -> None:
    layers = layers_with_a_tied_pair()
    ours = mlp_to_onnx(layers, doc=doc)
    assert ours == built_with_onnx_helper(layers, doc)
    model = onnx.load_from_string(ours)
    onnx.checker.check_model(model, full_check=True)
    assert len(model.graph.initializer) == 7  # the tied weight is stored once


def test_onnx_runtime_computes_what_the_layers_compute() -> None:
    layers = layers_with_a_tied_pair()
    session = ort.InferenceSession(mlp_to_onnx(layers), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)
    (got,) = session.run(None, {"input": x})
    np.testing.assert_allclose(got, mlp_forward(layers, x), rtol=1e-4, atol=1e-3)  # values reach ~100
    assert session.get_inputs()[0].shape == ["batch", 8]


def test_a_relu_on_the_last_layer_ends_the_graph() -> None:
    rng = np.random.default_rng(5)
    layers = [DenseLayer(rng.standard_normal((4, 3)).astype(np.float32), np.ones(4, np.float32), "relu")]
    model = onnx.load_from_string(mlp_to_onnx(layers, input_name="x", output_name="y"))
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu"]
    assert model.graph.output[0].name == "y"


@pytest.mark.parametrize(("inp", "out"), [("", "y"), ("x", ""), ("same", "same")])
def test_names_must_be_distinct_and_present(inp: str, out: str) -> None:
    layers = layers_with_a_tied_pair()
    with pytest.raises(ValueError, match="distinct non-empty"):
        mlp_to_onnx(layers, input_name=inp, output_name=out)
