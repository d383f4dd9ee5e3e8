"""The node's gRPC messages, declared from a table, against the generated code `tritonclient.grpc` ships
(Triton's own grpc_service.proto and model_config.proto): every field the node declares must have the
protocol's number, type, cardinality, message type and oneof, or clients would read other fields."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2, service_pb2

from edgegen.http.grpc_messages import _MESSAGES, POOL, SERVICE, message


def triton_descriptor(name: str) -> Descriptor:
    for module in (service_pb2, model_config_pb2):
        if name in module.DESCRIPTOR.message_types_by_name:
            return module.DESCRIPTOR.message_types_by_name[name]
    raise AssertionError(f"Triton has no message {name}")


def shape(field: FieldDescriptor) -> tuple[object, ...]:
    kind = field.message_type or field.enum_type
    oneof = field.containing_oneof
    return (
        field.number,
        field.type,
        field.is_repeated,
        kind.full_name if kind is not None else "",
        oneof.name if oneof is not None else "",
    )


def check(ours: Descriptor, theirs: Descriptor) -> None:
    assert ours.full_name == theirs.full_name
    for field in ours.fields:
        assert field.name in theirs.fields_by_name, f"{ours.full_name}.{field.name} is not Triton's"
        assert shape(field) == shape(theirs.fields_by_name[field.name]), f"{ours.full_name}.{field.name}"
    for nested in ours.nested_types:
        check(nested, theirs.nested_types_by_name[nested.name])
    for enum in ours.enum_types:
        values = {v.name: v.number for v in theirs.enum_types_by_name[enum.name].values}
        assert {v.name: v.number for v in enum.values} == values


@pytest.mark.parametrize("name", [n for n, (fields, _, _) in _MESSAGES.items() if fields])
def test_every_field_is_the_protocol_s(name: str) -> None:
    check(POOL.FindMessageTypeByName(f"inference.{name}"), triton_descriptor(name))


def test_requests_without_fields_are_triton_s_empty_ones() -> None:
    for name, (fields, _, _) in _MESSAGES.items():
        if not fields:
            assert not triton_descriptor(name).fields, name


def test_the_data_type_enum_is_triton_s() -> None:
    ours = POOL.FindEnumTypeByName("inference.DataType")
    theirs = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    assert {v.name: v.number for v in ours.values} == {v.name: v.number for v in theirs.values}


def test_the_service_name_is_triton_s() -> None:
    assert service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == SERVICE


def test_a_request_tritonclient_encodes_reads_back_whole() -> None:
    """What the client's generated code writes, ours reads, and the other way round: maps, oneofs,
    typed and raw contents."""
    theirs = service_pb2.ModelInferRequest(model_name="digits", model_version="1", id="x")
    tensor = theirs.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    tensor.parameters["binary_data_size"].int64_param = 512
    tensor.contents.fp32_contents.extend([0.5] * 128)
    theirs.outputs.add(name="logits").parameters["classification"].int64_param = 3
    theirs.parameters["priority"].uint64_param = 2
    theirs.raw_input_contents.append(np.ones(3, "<f4").tobytes())
    ours = message("ModelInferRequest").FromString(theirs.SerializeToString())
    assert ours.inputs[0].parameters["binary_data_size"].WhichOneof("parameter_choice") == "int64_param"
    assert list(ours.inputs[0].contents.fp32_contents) == [0.5] * 128
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    assert ours.parameters["priority"].uint64_param == 2
    assert service_pb2.ModelInferRequest.FromString(ours.SerializeToString()) == theirs


def test_a_config_reads_as_triton_s() -> None:
    config = message("ModelConfig")(name="digits", max_batch_size=32)
    config.input.add(name="input", data_type=11, dims=[64])
    config.instance_group.add(kind=2, count=1)
    config.dynamic_batching.max_queue_delay_microseconds = 100
    theirs = model_config_pb2.ModelConfig.FromString(config.SerializeToString())
    assert theirs.input[0].data_type == model_config_pb2.TYPE_FP32
    assert theirs.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert theirs.WhichOneof("scheduling_choice") == "dynamic_batching"
