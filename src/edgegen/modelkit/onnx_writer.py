"""Write a dense MLP as an ONNX model without the `onnx` package: the protobuf encoded here.

An edge node builds its default model itself (`edgegen models pull digits`) and must not need the
`onnx` package (and its protobuf runtime) for it, so this module encodes the few messages an MLP needs
straight from onnx.proto3's field numbers. The graph:

- one `Gemm(x, W, b, transB=1)` per layer, W kept in nn.Linear's (out, in) layout, followed by `Relu`
  where the layer has one; ONNX Runtime fuses Gemm+Relu itself at load time;
- the batch dimension is symbolic ("batch"), so the node can stack requests;
- layers that share one weight array (tied layers) share one initializer.

onnx.proto is proto2: a field is written when it is set, repeated scalars are not packed. Fields are
written in field-number order, as protobuf's own serializer does, so the bytes equal those `onnx.helper`
builds for the same graph (tests/unit/modelkit checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgegen.modelkit.layers import DenseLayer, check_chain, check_io_names

OPSET = 17
IR_VERSION = 9
_FLOAT = 1  # TensorProto.DataType.FLOAT
_ATTRIBUTE_INT = 2  # AttributeProto.AttributeType.INT
_VARINT, _LENGTH_DELIMITED = 0, 2


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 fields: a negative value is its two's complement, ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, value: int) -> bytes:
    return _tag(field, _VARINT) + _varint(value) if value else b""


def _message(field: int, body: bytes) -> bytes:
    """A length-delimited field: a sub-message (written even when empty: its presence counts) or bytes."""
    return _tag(field, _LENGTH_DELIMITED) + _varint(len(body)) + body


def _text(field: int, value: str) -> bytes:
    return _message(field, value.encode()) if value else b""


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims (1, one field each), data_type (2), name (8), raw_data (9, little-endian)."""
    dims = b"".join(_int(1, d) for d in array.shape)
    raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return dims + _int(2, _FLOAT) + _text(8, name) + _message(9, raw)


def _value_info(name: str, dims: Sequence[int | str]) -> bytes:
    """ValueInfoProto name (1), type (2) → TypeProto.tensor_type (1) → elem_type (1), shape (2)."""
    shape = b"".join(
        _message(1, _text(2, d) if isinstance(d, str) else _int(1, d)) for d in dims
    )  # TensorShapeProto.dim: dim_value (1) or dim_param (2)
    tensor_type = _int(1, _FLOAT) + _message(2, shape)
    return _text(1, name) + _message(2, _message(1, tensor_type))


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, trans_b: bool = False) -> bytes:
    """NodeProto input (1), output (2), name (3), op_type (4), attribute (5)."""
    body = b"".join(_text(1, i) for i in inputs) + b"".join(_text(2, o) for o in outputs)
    body += _text(3, name) + _text(4, op)
    if trans_b:  # AttributeProto name (1), i (3), type (20)
        body += _message(5, _text(1, "transB") + _int(3, 1) + _int(20, _ATTRIBUTE_INT))
    return body


def mlp_to_onnx(
    layers: Sequence[DenseLayer], *, input_name: str = "input", output_name: str = "logits", doc: str = ""
) -> bytes:
    """Serialize `layers` as an ONNX model: input (batch, in) float32 -> output (batch, out) float32."""
    check_chain(layers)
    check_io_names(input_name, output_name)
    nodes: list[bytes] = []
    initializers: list[bytes] = []
    current = input_name
    written: dict[int, str] = {}  # id of a weight array → its initializer
    for i, layer in enumerate(layers, start=1):
        w, b = written.get(id(layer.weight), f"fc{i}.weight"), f"fc{i}.bias"
        if id(layer.weight) not in written:
            written[id(layer.weight)] = w
            initializers.append(_tensor(w, layer.weight))
        initializers.append(_tensor(b, layer.bias))
        last = i == len(layers)
        gemm_out = output_name if last and layer.activation == "none" else f"fc{i}.out"
        nodes.append(_node("Gemm", [current, w, b], [gemm_out], f"fc{i}", trans_b=True))
        current = gemm_out
        if layer.activation == "relu":
            relu_out = output_name if last else f"relu{i}.out"
            nodes.append(_node("Relu", [current], [relu_out], f"relu{i}"))
            current = relu_out
    # GraphProto node (1), name (2), initializer (5), input (11), output (12).
    graph = b"".join(_message(1, n) for n in nodes) + _text(2, "mlp")
    graph += b"".join(_message(5, t) for t in initializers)
    graph += _message(11, _value_info(input_name, ["batch", layers[0].in_features]))
    graph += _message(12, _value_info(output_name, ["batch", layers[-1].out_features]))
    # ModelProto ir_version (1), producer_name (2), doc_string (6, set even when empty, as onnx.helper
    # sets it), graph (7), opset_import (8) →
    # OperatorSetIdProto domain (1, set to the default "" as onnx.helper sets it), version (2).
    model = _int(1, IR_VERSION) + _text(2, "edgegen") + _message(6, doc.encode()) + _message(7, graph)
    return model + _message(8, _message(1, b"") + _int(2, OPSET))
