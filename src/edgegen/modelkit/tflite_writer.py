"""Write a dense MLP as a .tflite file without TensorFlow.

The file is a TFLite flatbuffer (schema version 3, file identifier "TFL3" at bytes 4:8),
built with the generated `tflite` schema code. For N layers it holds one subgraph "main":

- tensors: 0 is the float32 input [1, in] (shape_signature [-1, in], so the batch can be
  resized); layer i then adds 1+3i its weight [out, in], 2+3i its bias [out] and 3+3i its
  activation [1, out] (shape_signature [-1, out]); the last activation is the output.
- buffers: 0 is the empty sentinel that every non-constant tensor points at; layer i stores
  its weight in buffer 1+2i and its bias in buffer 2+2i, raw little-endian float32 (weights
  row-major in nn.Linear's (out, in) layout), each data vector 16-byte aligned in the file.
- operators: one FULLY_CONNECTED per layer (inputs: previous activation, weight, bias),
  fused activation RELU or NONE, keep_num_dims false.
- signature_defs: "serving_default" maps input_name -> tensor 0 and output_name -> output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

# flatbuffers and the generated tflite schema code ship no types; every call that ends a table or a
# vector returns its offset in the buffer, an int, so those returns are cast to int below.
import flatbuffers
import numpy as np
import tflite

from edgegen.modelkit.layers import DenseLayer, check_chain, check_io_names

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"
SIGNATURE_KEY = "serving_default"
# Enough for XNNPACK and other SIMD kernels to read weights in place from a mapped file.
_DATA_ALIGNMENT = 16
_ACTIVATIONS: dict[str, int] = {
    "relu": tflite.ActivationFunctionType.RELU,
    "none": tflite.ActivationFunctionType.NONE,
}


def mlp_to_tflite(
    layers: Sequence[DenseLayer],
    *,
    input_name: str = "input",
    output_name: str = "logits",
    description: str = "edgegen",
) -> bytes:
    """Serialize ``layers`` to TFLite flatbuffer bytes (layout in the module docstring)."""
    check_chain(layers)
    check_io_names(input_name, output_name)

    b = flatbuffers.Builder(1024 + sum(layer.weight.nbytes + layer.bias.nbytes for layer in layers))

    # Flatbuffers are written back to front: the big data buffers go first and so land at the
    # end of the file, after all tables.
    buffers = [_buffer(b, None)]
    for layer in layers:
        buffers.append(_buffer(b, layer.weight))
        buffers.append(_buffer(b, layer.bias))

    tensors = [_tensor(b, input_name, layers[0].in_features, batched=True)]
    operators = []
    prev = 0
    for i, layer in enumerate(layers):
        base = len(tensors)
        tensors.append(_tensor(b, f"dense_{i}/weight", *layer.weight.shape, buffer=1 + 2 * i))
        tensors.append(_tensor(b, f"dense_{i}/bias", layer.out_features, buffer=2 + 2 * i))
        name = output_name if i == len(layers) - 1 else f"dense_{i}/output"
        tensors.append(_tensor(b, name, layer.out_features, batched=True))
        operators.append(_fully_connected(b, [prev, base, base + 1], base + 2, layer.activation))
        prev = base + 2
    output = prev

    subgraph_name = b.CreateString("main")
    tensors_vec = _offset_vector(b, tensors)
    inputs_vec = _int32_vector(b, [0])
    outputs_vec = _int32_vector(b, [output])
    operators_vec = _offset_vector(b, operators)
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, inputs_vec)
    tflite.SubGraphAddOutputs(b, outputs_vec)
    tflite.SubGraphAddOperators(b, operators_vec)
    tflite.SubGraphAddName(b, subgraph_name)
    subgraph = tflite.SubGraphEnd(b)

    tflite.OperatorCodeStart(b)
    # Readers take max(deprecated_builtin_code, builtin_code); old ones only see the int8 field.
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddBuiltinCode(b, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(b, 1)  # float32 FULLY_CONNECTED is version 1
    opcode = tflite.OperatorCodeEnd(b)

    signature = _signature(b, input_name, 0, output_name, output)

    description_str = b.CreateString(description)
    opcodes_vec = _offset_vector(b, [opcode])
    subgraphs_vec = _offset_vector(b, [subgraph])
    buffers_vec = _offset_vector(b, buffers)
    signatures_vec = _offset_vector(b, [signature])
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, opcodes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, description_str)
    tflite.ModelAddBuffers(b, buffers_vec)
    tflite.ModelAddSignatureDefs(b, signatures_vec)
    model = tflite.ModelEnd(b)
    b.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _buffer(b: flatbuffers.Builder, array: np.ndarray | None) -> int:
    if array is None:
        tflite.BufferStart(b)
        return cast(int, tflite.BufferEnd(b))
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    # Pad so the bytes (not the length prefix) start aligned; Finish pads the whole file to
    # the largest alignment used, so this holds for absolute file offsets too.
    b.Prep(_DATA_ALIGNMENT, len(data))
    data_vec = b.CreateByteVector(data)
    tflite.BufferStart(b)
    tflite.BufferAddData(b, data_vec)
    return cast(int, tflite.BufferEnd(b))


def _tensor(b: flatbuffers.Builder, name: str, *dims: int, batched: bool = False, buffer: int = 0) -> int:
    """A float32 tensor; ``batched`` prepends a batch dim that is 1 in shape, -1 in signature."""
    shape = [1, *dims] if batched else list(dims)
    name_str = b.CreateString(name)
    shape_vec = _int32_vector(b, shape)
    signature_vec = _int32_vector(b, [-1, *dims]) if batched else None
    tflite.TensorStart(b)
    tflite.TensorAddShape(b, shape_vec)
    tflite.TensorAddType(b, tflite.TensorType.FLOAT32)
    tflite.TensorAddBuffer(b, buffer)
    tflite.TensorAddName(b, name_str)
    if signature_vec is not None:
        tflite.TensorAddShapeSignature(b, signature_vec)
    return cast(int, tflite.TensorEnd(b))


def _fully_connected(b: flatbuffers.Builder, inputs: list[int], output: int, activation: str) -> int:
    inputs_vec = _int32_vector(b, inputs)
    outputs_vec = _int32_vector(b, [output])
    tflite.FullyConnectedOptionsStart(b)
    tflite.FullyConnectedOptionsAddFusedActivationFunction(b, _ACTIVATIONS[activation])
    tflite.FullyConnectedOptionsAddWeightsFormat(b, tflite.FullyConnectedOptionsWeightsFormat.DEFAULT)
    tflite.FullyConnectedOptionsAddKeepNumDims(b, False)
    options = tflite.FullyConnectedOptionsEnd(b)
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, 0)  # the model's only operator code
    tflite.OperatorAddInputs(b, inputs_vec)
    tflite.OperatorAddOutputs(b, outputs_vec)
    tflite.OperatorAddBuiltinOptionsType(b, tflite.BuiltinOptions.FullyConnectedOptions)
    tflite.OperatorAddBuiltinOptions(b, options)
    return cast(int, tflite.OperatorEnd(b))


def _signature(
    b: flatbuffers.Builder, input_name: str, input_idx: int, output_name: str, output_idx: int
) -> int:
    inputs_vec = _offset_vector(b, [_tensor_map(b, input_name, input_idx)])
    outputs_vec = _offset_vector(b, [_tensor_map(b, output_name, output_idx)])
    key = b.CreateString(SIGNATURE_KEY)
    tflite.SignatureDefStart(b)
    tflite.SignatureDefAddInputs(b, inputs_vec)
    tflite.SignatureDefAddOutputs(b, outputs_vec)
    tflite.SignatureDefAddSignatureKey(b, key)
    tflite.SignatureDefAddSubgraphIndex(b, 0)
    return cast(int, tflite.SignatureDefEnd(b))


def _tensor_map(b: flatbuffers.Builder, name: str, tensor_index: int) -> int:
    name_str = b.CreateString(name)
    tflite.TensorMapStart(b)
    tflite.TensorMapAddName(b, name_str)
    tflite.TensorMapAddTensorIndex(b, tensor_index)
    return cast(int, tflite.TensorMapEnd(b))


def _int32_vector(b: flatbuffers.Builder, values: list[int]) -> int:
    return cast(int, b.CreateNumpyVector(np.asarray(values, dtype=np.int32)))


def _offset_vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    # Prepending builds the vector back to front, so walk the offsets in reverse.
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return cast(int, b.EndVector())
