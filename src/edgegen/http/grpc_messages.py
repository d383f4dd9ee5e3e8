"""The messages of KServe v2's gRPC protocol (`inference.GRPCInferenceService`, as Triton defines it), built
from a table at import time instead of from generated code.

Only what the node answers is declared: the health, metadata, configuration, statistics and inference
calls, and of Triton's `ModelConfig` the fields the node fills in (node/triton.py). A client that sends a
field declared nowhere here is still understood: protobuf keeps unknown fields aside and never fails on
them. Field numbers, types and names are the protocol's; `tests/unit/node/test_grpc_messages.py` checks
every one against the generated code `tritonclient.grpc` ships.

The messages live in a pool of their own, so a process that also imports `tritonclient.grpc` (which
registers the same full names in protobuf's default pool) holds both.

    TYPE        a scalar (`string`, `bool`, `int32`, `int64`, `uint32`, `uint64`, `float`, `double`,
                `bytes`), a message or an enum of this table (`Name`, or `Outer.Name` when nested)
    repeated T  a list of T
    map T       a map from string to T (protobuf's map entry, declared for it)
    oneof O T   a T in the oneof named O
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"

_Fields = tuple[tuple[str, int, str], ...]

_SCALARS = {
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "float": descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
}

_NAME_VERSION: _Fields = (("name", 1, "string"), ("version", 2, "string"))
_TENSOR: _Fields = (
    ("name", 1, "string"),
    ("datatype", 2, "string"),
    ("shape", 3, "repeated int64"),
    ("parameters", 4, "map InferParameter"),
    ("contents", 5, "InferTensorContents"),
)

# name -> (fields, nested messages, nested enums)
_MESSAGES: dict[str, tuple[_Fields, dict[str, _Fields], dict[str, tuple[str, ...]]]] = {
    "ServerLiveRequest": ((), {}, {}),
    "ServerLiveResponse": ((("live", 1, "bool"),), {}, {}),
    "ServerReadyRequest": ((), {}, {}),
    "ServerReadyResponse": ((("ready", 1, "bool"),), {}, {}),
    "ModelReadyRequest": (_NAME_VERSION, {}, {}),
    "ModelReadyResponse": ((("ready", 1, "bool"),), {}, {}),
    "ServerMetadataRequest": ((), {}, {}),
    "ServerMetadataResponse": (
        (("name", 1, "string"), ("version", 2, "string"), ("extensions", 3, "repeated string")),
        {},
        {},
    ),
    "ModelMetadataRequest": (_NAME_VERSION, {}, {}),
    "ModelMetadataResponse": (
        (
            ("name", 1, "string"),
            ("versions", 2, "repeated string"),
            ("platform", 3, "string"),
            ("inputs", 4, "repeated ModelMetadataResponse.TensorMetadata"),
            ("outputs", 5, "repeated ModelMetadataResponse.TensorMetadata"),
        ),
        {
            "TensorMetadata": (
                ("name", 1, "string"),
                ("datatype", 2, "string"),
                ("shape", 3, "repeated int64"),
            )
        },
        {},
    ),
    "InferParameter": (
        (
            ("bool_param", 1, "oneof parameter_choice bool"),
            ("int64_param", 2, "oneof parameter_choice int64"),
            ("string_param", 3, "oneof parameter_choice string"),
            ("double_param", 4, "oneof parameter_choice double"),
            ("uint64_param", 5, "oneof parameter_choice uint64"),
        ),
        {},
        {},
    ),
    "InferTensorContents": (
        (
            ("bool_contents", 1, "repeated bool"),
            ("int_contents", 2, "repeated int32"),
            ("int64_contents", 3, "repeated int64"),
            ("uint_contents", 4, "repeated uint32"),
            ("uint64_contents", 5, "repeated uint64"),
            ("fp32_contents", 6, "repeated float"),
            ("fp64_contents", 7, "repeated double"),
            ("bytes_contents", 8, "repeated bytes"),
        ),
        {},
        {},
    ),
    "ModelInferRequest": (
        (
            ("model_name", 1, "string"),
            ("model_version", 2, "string"),
            ("id", 3, "string"),
            ("parameters", 4, "map InferParameter"),
            ("inputs", 5, "repeated ModelInferRequest.InferInputTensor"),
            ("outputs", 6, "repeated ModelInferRequest.InferRequestedOutputTensor"),
            ("raw_input_contents", 7, "repeated bytes"),
        ),
        {
            "InferInputTensor": _TENSOR,
            "InferRequestedOutputTensor": (("name", 1, "string"), ("parameters", 2, "map InferParameter")),
        },
        {},
    ),
    "ModelInferResponse": (
        (
            ("model_name", 1, "string"),
            ("model_version", 2, "string"),
            ("id", 3, "string"),
            ("parameters", 4, "map InferParameter"),
            ("outputs", 5, "repeated ModelInferResponse.InferOutputTensor"),
            ("raw_output_contents", 6, "repeated bytes"),
        ),
        {"InferOutputTensor": _TENSOR},
        {},
    ),
    "ModelConfigRequest": (_NAME_VERSION, {}, {}),
    "ModelConfigResponse": ((("config", 1, "ModelConfig"),), {}, {}),
    "ModelStatisticsRequest": (_NAME_VERSION, {}, {}),
    "ModelStatisticsResponse": ((("model_stats", 1, "repeated ModelStatistics"),), {}, {}),
    "StatisticDuration": ((("count", 1, "uint64"), ("ns", 2, "uint64")), {}, {}),
    "InferStatistics": (
        tuple(
            (name, number, "StatisticDuration")
            for number, name in enumerate(
                (
                    "success",
                    "fail",
                    "queue",
                    "compute_input",
                    "compute_infer",
                    "compute_output",
                    "cache_hit",
                    "cache_miss",
                ),
                start=1,
            )
        ),
        {},
        {},
    ),
    "InferBatchStatistics": (
        (
            ("batch_size", 1, "uint64"),
            ("compute_input", 2, "StatisticDuration"),
            ("compute_infer", 3, "StatisticDuration"),
            ("compute_output", 4, "StatisticDuration"),
        ),
        {},
        {},
    ),
    "ModelStatistics": (
        (
            *_NAME_VERSION,
            ("last_inference", 3, "uint64"),
            ("inference_count", 4, "uint64"),
            ("execution_count", 5, "uint64"),
            ("inference_stats", 6, "InferStatistics"),
            ("batch_stats", 7, "repeated InferBatchStatistics"),
        ),
        {},
        {},
    ),
    # Triton's model configuration (model_config.proto), the fields node/triton.py fills in.
    "ModelConfig": (
        (
            ("name", 1, "string"),
            ("platform", 2, "string"),
            ("backend", 17, "string"),
            ("max_batch_size", 4, "int32"),
            ("input", 5, "repeated ModelInput"),
            ("output", 6, "repeated ModelOutput"),
            ("dynamic_batching", 11, "oneof scheduling_choice ModelDynamicBatching"),
            ("instance_group", 7, "repeated ModelInstanceGroup"),
            ("default_model_filename", 8, "string"),
        ),
        {},
        {},
    ),
    "ModelInput": (
        (("name", 1, "string"), ("data_type", 2, "DataType"), ("dims", 4, "repeated int64")),
        {},
        {},
    ),
    "ModelOutput": (
        (("name", 1, "string"), ("data_type", 2, "DataType"), ("dims", 3, "repeated int64")),
        {},
        {},
    ),
    "ModelInstanceGroup": (
        (("name", 1, "string"), ("kind", 4, "ModelInstanceGroup.Kind"), ("count", 2, "int32")),
        {},
        {"Kind": ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")},
    ),
    "ModelDynamicBatching": (
        (("max_queue_delay_microseconds", 2, "uint64"), ("default_queue_policy", 6, "ModelQueuePolicy")),
        {},
        {},
    ),
    "ModelQueuePolicy": ((("max_queue_size", 4, "uint32"),), {}, {}),
}
_ENUMS = {
    "DataType": (
        "TYPE_INVALID",
        "TYPE_BOOL",
        "TYPE_UINT8",
        "TYPE_UINT16",
        "TYPE_UINT32",
        "TYPE_UINT64",
        "TYPE_INT8",
        "TYPE_INT16",
        "TYPE_INT32",
        "TYPE_INT64",
        "TYPE_FP16",
        "TYPE_FP32",
        "TYPE_FP64",
        "TYPE_STRING",
        "TYPE_BF16",
    )
}


def _is_enum(name: str) -> bool:
    outer, _, inner = name.partition(".")
    return name in _ENUMS or (bool(inner) and inner in _MESSAGES.get(outer, ((), {}, {}))[2])


def _enum(proto: descriptor_pb2.EnumDescriptorProto, name: str, values: tuple[str, ...]) -> None:
    proto.name = name
    for number, value in enumerate(values):
        proto.value.add(name=value, number=number)


def _message(proto: descriptor_pb2.DescriptorProto, name: str, fields: _Fields, scope: str) -> None:
    """Fill `proto` with `fields`; a `map T` field gets its entry message, nested in `proto`."""
    label = descriptor_pb2.FieldDescriptorProto
    proto.name = name
    oneofs: dict[str, int] = {}
    for field_name, number, spec in fields:
        field = proto.field.add(name=field_name, number=number, label=label.LABEL_OPTIONAL)
        words = spec.split()
        if words[0] == "repeated":
            field.label = label.LABEL_REPEATED
            words = words[1:]
        elif words[0] == "map":
            entry = proto.nested_type.add(
                name="".join(p.capitalize() for p in field_name.split("_")) + "Entry"
            )
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, label=label.LABEL_OPTIONAL, type=_SCALARS["string"])
            entry.field.add(
                name="value", number=2, label=label.LABEL_OPTIONAL, type=label.TYPE_MESSAGE,
                type_name=f".{PACKAGE}.{words[1]}",
            )  # fmt: skip
            field.label = label.LABEL_REPEATED
            field.type = label.TYPE_MESSAGE
            field.type_name = f".{scope}.{entry.name}"
            continue
        elif words[0] == "oneof":
            field.oneof_index = oneofs.setdefault(words[1], len(oneofs))
            words = words[2:]
        kind = words[0]
        if kind in _SCALARS:
            field.type = _SCALARS[kind]
        else:
            field.type = label.TYPE_ENUM if _is_enum(kind) else label.TYPE_MESSAGE
            field.type_name = f".{PACKAGE}.{kind}"
    for oneof in oneofs:
        proto.oneof_decl.add(name=oneof)


def _build() -> descriptor_pool.DescriptorPool:
    file = descriptor_pb2.FileDescriptorProto(
        name="edgegen/kserve_v2.proto", package=PACKAGE, syntax="proto3"
    )
    for name, values in _ENUMS.items():
        _enum(file.enum_type.add(), name, values)
    for name, (fields, nested, enums) in _MESSAGES.items():
        proto = file.message_type.add()
        _message(proto, name, fields, f"{PACKAGE}.{name}")
        for inner, inner_fields in nested.items():
            _message(proto.nested_type.add(), inner, inner_fields, f"{PACKAGE}.{name}.{inner}")
        for inner, names in enums.items():
            _enum(proto.enum_type.add(), inner, names)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


POOL = _build()


@functools.cache
def message(name: str) -> Any:
    """The class of message `name` (without the package), e.g. `message("ModelInferRequest")`."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))
