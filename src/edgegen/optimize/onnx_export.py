"""ONNX export of a dense MLP, written node by node with `onnx.helper`.

Each layer becomes one `Gemm(x, W, b, transB=1)` (W kept in nn.Linear's (out, in) layout) followed by
`Relu` where the layer has one; the batch dimension is symbolic ("batch"), so the node can stack
requests. Layers that share one weight array (tied layers) share one initializer. Writing the graph
ourselves keeps the export exact and free of the tracing exporter's version churn; ONNX Runtime fuses
Gemm+Relu itself at load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegen.optimize.layers import DenseLayer, check_chain

OPSET = 17


def mlp_to_onnx(
    layers: Sequence[DenseLayer], *, input_name: str = "input", output_name: str = "logits", doc: str = ""
) -> bytes:
    """Serialize `layers` as an ONNX model: input (batch, in) float32 -> output (batch, out) float32."""
    check_chain(layers)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = input_name
    written: dict[int, str] = {}  # id of a weight array → its initializer
    for i, layer in enumerate(layers, start=1):
        w, b = written.get(id(layer.weight), f"fc{i}.weight"), f"fc{i}.bias"
        if id(layer.weight) not in written:
            written[id(layer.weight)] = w
            initializers.append(numpy_helper.from_array(layer.weight, w))
        initializers.append(numpy_helper.from_array(layer.bias, b))
        last = i == len(layers)
        gemm_out = output_name if last and layer.activation == "none" else f"fc{i}.out"
        nodes.append(helper.make_node("Gemm", [current, w, b], [gemm_out], name=f"fc{i}", transB=1))
        current = gemm_out
        if layer.activation == "relu":
            relu_out = output_name if last else f"relu{i}.out"
            nodes.append(helper.make_node("Relu", [current], [relu_out], name=f"relu{i}"))
            current = relu_out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", layers[0].in_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", layers[-1].out_features])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgegen", doc_string=doc
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    return cast(bytes, model.SerializeToString())  # protobuf's messages carry no types here
