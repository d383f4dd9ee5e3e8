"""A gateway's KServe v2 over gRPC (http/grpc.py): each call is relayed as its HTTP twin, body and all.

The twin is the request an HTTP client of the same protocol would send: `ModelInfer` becomes a POST in
Triton's binary tensor form (raw contents as they came, typed contents as JSON values), the other calls
GETs. It goes through the gateway's stack like any request — the gate, then the proxy's balancer for
the model, its retries and ejections — to a node over HTTP, so nodes need no gRPC port of their own;
the node's answer becomes the reply (binary outputs as raw contents, JSON as the message it describes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format

from edgegen.errors import InvalidInput
from edgegen.http.datatypes import V2_TYPES
from edgegen.http.grpc import (
    Answer,
    Route,
    Rpc,
    Twin,
    check_raw,
    fixed_path,
    infer_path,
    model_route,
    statistics_path,
    typed_values,
)
from edgegen.http.grpc_messages import message

HEADER_LENGTH = b"inference-header-content-length"


def _get(path: Route) -> Callable[[Any, float | None], Twin]:
    def twin(request: Any, deadline_s: float | None) -> Twin:
        decoded, raw = path(request)
        return Twin("GET", decoded, raw)

    return twin


def _parsed(response: str) -> Callable[[Any, Twin, Answer], Any]:
    """A reply that is the JSON of a successful answer, read as message `response` (fields it does not
    declare are left out)."""

    def reply(request: Any, twin: Twin, answer: Answer) -> Any:
        return json_format.ParseDict(
            orjson.loads(answer.ok().body), message(response)(), ignore_unknown_fields=True
        )

    return reply


def _readiness(response: str, *, not_served: bool = False) -> Callable[[Any, Twin, Answer], Any]:
    """Ready on a 200, not ready on a 503 (or a 404: a model no node serves); any other status refuses."""

    def reply(request: Any, twin: Twin, answer: Answer) -> Any:
        if answer.status == 503 or (not_served and answer.status == 404):
            return message(response)(ready=False)
        answer.ok()
        return message(response)(ready=True)

    return reply


def _config(request: Any, twin: Twin, answer: Answer) -> Any:
    config = json_format.ParseDict(
        orjson.loads(answer.ok().body), message("ModelConfig")(), ignore_unknown_fields=True
    )
    return message("ModelConfigResponse")(config=config)


def infer_twin(request: Any, deadline_s: float | None) -> Twin:
    """`POST /v2/models/{name}[/versions/{v}]/infer` in Triton's binary tensor form, outputs asked in
    binary too."""
    raw = check_raw(request)
    inputs: list[dict[str, Any]] = []
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if raw:
            entry["parameters"] = {"binary_data_size": len(request.raw_input_contents[i])}
        elif tensor.datatype in V2_TYPES:
            entry["data"] = list(typed_values(tensor))
        else:
            raise InvalidInput(f"input {tensor.name!r}: datatype {tensor.datatype!r} is not served here")
        inputs.append(entry)
    header: dict[str, Any] = {"inputs": inputs, "parameters": {"binary_data_output": True}}
    if request.id:
        header["id"] = request.id
    if request.outputs:
        header["outputs"] = [{"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs]
    head = orjson.dumps(header)
    body = head + b"".join(request.raw_input_contents) if raw else head
    decoded, raw_path = infer_path(request)
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(len(body)).encode()),
        (HEADER_LENGTH, str(len(head)).encode()),
    ]
    return Twin("POST", decoded, raw_path, body, headers)


def infer_reply(request: Any, twin: Twin, answer: Answer) -> Any:
    """The node's binary (or JSON) answer as a `ModelInferResponse`, every output as raw contents."""
    body = answer.ok().body
    given = next((v for k, v in answer.headers if k == HEADER_LENGTH), None)
    split = int(given) if given is not None and given.isdigit() else len(body)
    head, binary = orjson.loads(body[:split]), memoryview(body)[split:]
    response = message("ModelInferResponse")(
        model_name=head.get("model_name", ""),
        model_version=head.get("model_version", ""),
        id=head.get("id", ""),
    )
    offset = 0
    for output in head.get("outputs", []):
        datatype = output["datatype"]
        response.outputs.add(name=output["name"], datatype=datatype, shape=output["shape"])
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            response.raw_output_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        else:
            values = np.asarray(output["data"], dtype=np.dtype(V2_TYPES[datatype]).newbyteorder("<"))
            response.raw_output_contents.append(values.tobytes())
    return response


RPCS = {
    "ServerLive": Rpc(
        "ServerLiveRequest",
        "ServerLiveResponse",
        _get(fixed_path("/v2/health/live")),
        _parsed("ServerLiveResponse"),
    ),
    "ServerReady": Rpc(
        "ServerReadyRequest",
        "ServerReadyResponse",
        _get(fixed_path("/v2/health/ready")),
        _readiness("ServerReadyResponse"),
    ),
    "ModelReady": Rpc(
        "ModelReadyRequest",
        "ModelReadyResponse",
        _get(model_route("/ready")),
        _readiness("ModelReadyResponse", not_served=True),
    ),
    "ServerMetadata": Rpc(
        "ServerMetadataRequest",
        "ServerMetadataResponse",
        _get(fixed_path("/v2")),
        _parsed("ServerMetadataResponse"),
    ),
    "ModelMetadata": Rpc(
        "ModelMetadataRequest",
        "ModelMetadataResponse",
        _get(model_route("")),
        _parsed("ModelMetadataResponse"),
    ),
    "ModelConfig": Rpc("ModelConfigRequest", "ModelConfigResponse", _get(model_route("/config")), _config),
    "ModelStatistics": Rpc(
        "ModelStatisticsRequest",
        "ModelStatisticsResponse",
        _get(statistics_path),
        _parsed("ModelStatisticsResponse"),
    ),
    "ModelInfer": Rpc("ModelInferRequest", "ModelInferResponse", infer_twin, infer_reply),
}
