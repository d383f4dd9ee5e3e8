"""KServe v2's tensor datatypes and the numpy dtypes they are, for every protocol that speaks them (HTTP
and gRPC, at a node and at a gateway). BYTES has no numpy dtype here: no model a node serves takes it."""

from __future__ import annotations

V2_TYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TYPES = {v: k for k, v in V2_TYPES.items()}
