"""A node's KServe v2 over gRPC (http/grpc.py): each call's handler runs past the gate, in the node.

The twin of a call carries no body: the request message itself rides in its scope to `GrpcCalls`, in
front of the node's routes, which runs the handler — the same service, batcher, cache and limits the HTTP
routes use, with node/v2.py's validation — and answers with the HTTP status and headers an error or a
success would have, for the boundary to count and the server to map. Outputs go back as raw contents, as
Triton sends them; inputs come as raw or typed contents. A call's deadline bounds its wait
(DEADLINE_EXCEEDED, recorded as a 504), as `request_timeout_s` does.

Not served: the streaming call (`ModelStreamInfer`), the model repository, shared memory, trace and log
settings; gRPC answers them UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format
from starlette.types import ASGIApp, Receive, Scope, Send

from edgegen.engine.service import caller_of
from edgegen.errors import EdgegenError, InvalidInput, ModelNotFound
from edgegen.http.datatypes import NUMPY_TYPES
from edgegen.http.errors import render
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
from edgegen.node import v2
from edgegen.node.state import NodeState
from edgegen.security.auth import principal_of

log = logging.getLogger("edgegen.grpc")
CALL = "edgegen.grpc.call"  # the scope key of the call GrpcCalls runs
Handler = Callable[[NodeState, Scope, Any], Awaitable[Any]]


@dataclass(eq=False)
class GrpcCall:
    """One call on its way through the node's stack: its handler and request, and what it answers."""

    rpc: str  # the method's name, e.g. "ModelInfer"
    handler: Handler
    request: Any
    deadline_s: float | None  # what the client's deadline leaves, when it set one
    response: Any = None
    headers: dict[str, str] = field(default_factory=dict)  # of the answer: the cache's, Retry-After


class GrpcCalls:
    """In front of a node's routes: a scope that carries a gRPC call runs its handler; any other goes on.

    An edgegen error becomes its HTTP status and JSON body, exactly as the routes answer it (http/errors.py);
    the server maps the status to a gRPC code."""

    def __init__(self, app: ASGIApp, node: NodeState) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call: GrpcCall | None = scope.get(CALL)
        if call is None:
            await self.app(scope, receive, send)
            return
        status, body = 200, b""
        try:
            async with asyncio.timeout(call.deadline_s):
                call.response = await call.handler(self.node, scope, call.request)
        except EdgegenError as exc:
            status, body, told = render(exc)
            call.headers.update(told)
        except TimeoutError:
            status, body = 504, orjson.dumps({"error": "the call's deadline passed"})
        except Exception:
            log.exception("unhandled error", extra={"rpc": call.rpc})
            status, body = 500, orjson.dumps({"error": "internal error"})
        raw = [(k.lower().encode(), v.encode()) for k, v in call.headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


# -- the handlers: each gets the node, the call's scope (its principal, its caller) and its request ---------


async def _live(node: NodeState, scope: Scope, request: Any) -> Any:
    return message("ServerLiveResponse")(live=True)


async def _ready(node: NodeState, scope: Scope, request: Any) -> Any:
    return message("ServerReadyResponse")(ready=node.registry.ready)


async def _model_ready(node: NodeState, scope: Scope, request: Any) -> Any:
    # Triton answers "not ready" for a model it does not serve, rather than an error.
    try:
        v2.served_model(node, scope, request.name, request.version or None)
    except ModelNotFound:
        return message("ModelReadyResponse")(ready=False)
    return message("ModelReadyResponse")(ready=True)


async def _server_metadata(node: NodeState, scope: Scope, request: Any) -> Any:
    description = v2.server_description(principal_of(scope))
    return json_format.ParseDict(description, message("ServerMetadataResponse")())


async def _model_metadata(node: NodeState, scope: Scope, request: Any) -> Any:
    served = v2.served_model(node, scope, request.name, request.version or None)
    return json_format.ParseDict(v2.metadata(node, served.manifest), message("ModelMetadataResponse")())


async def _model_config(node: NodeState, scope: Scope, request: Any) -> Any:
    served = v2.served_model(node, scope, request.name, request.version or None)
    config = json_format.ParseDict(v2.configuration(served), message("ModelConfig")())
    return message("ModelConfigResponse")(config=config)


async def _model_statistics(node: NodeState, scope: Scope, request: Any) -> Any:
    if request.name:
        served = v2.served_model(node, scope, request.name, request.version or None)
        stats = {"model_stats": [v2.statistics(served)]}
    else:
        stats = v2.every_statistics(node, principal_of(scope))
    return json_format.ParseDict(stats, message("ModelStatisticsResponse")())


def _feeds(request: Any, specs: dict[str, Any]) -> dict[str, np.ndarray]:
    """A `ModelInferRequest`'s inputs, checked as node/v2.py checks the HTTP protocol's."""
    raw = check_raw(request)
    feeds: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name, shape, dtype = v2.input_spec(tensor.name, list(tensor.shape), tensor.datatype, specs)
        if name in feeds:
            raise InvalidInput(f"input {name!r} is given twice")
        if raw:
            feeds[name] = v2.from_bytes(name, request.raw_input_contents[i], dtype, shape)
        else:
            feeds[name] = v2.from_values(name, list(typed_values(tensor)), dtype, shape)
    v2.check_feeds(feeds, specs)
    return feeds


async def _model_infer(node: NodeState, scope: Scope, request: Any) -> Any:
    served = v2.served_model(node, scope, request.model_name, request.model_version or None)
    served.fixed_shape()
    manifest = served.manifest
    feeds = _feeds(request, {s.name: s for s in manifest.inputs})
    names = [o.name for o in manifest.outputs]
    wanted = [o.name for o in request.outputs] or names
    if unknown := [n for n in wanted if n not in names]:
        raise InvalidInput(f"unknown outputs {unknown}; the model's outputs are {names}")
    outputs, headers = await node.service.predict(caller_of(scope), served, feeds)
    scope[CALL].headers.update(headers)
    response = message("ModelInferResponse")(
        model_name=manifest.name, model_version=manifest.version, id=request.id
    )
    for name in wanted:
        array = outputs[name]
        response.outputs.add(name=name, datatype=NUMPY_TYPES[array.dtype.name], shape=array.shape)
        response.raw_output_contents.append(
            np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        )
    return response


def _rpc(request: str, response: str, method: str, route: Route, handler: Handler) -> Rpc:
    """A method whose twin carries the call itself to `GrpcCalls`, and whose reply is the handler's."""
    name = request.removesuffix("Request")

    def twin(message_in: Any, deadline_s: float | None) -> Twin:
        path, raw = route(message_in)
        return Twin(method, path, raw, scope={CALL: GrpcCall(name, handler, message_in, deadline_s)})

    def reply(message_in: Any, made: Twin, answer: Answer) -> Any:
        answer.ok()
        return made.scope[CALL].response

    return Rpc(request, response, twin, reply)


RPCS = {
    "ServerLive": _rpc(
        "ServerLiveRequest", "ServerLiveResponse", "GET", fixed_path("/v2/health/live"), _live
    ),
    "ServerReady": _rpc(
        "ServerReadyRequest", "ServerReadyResponse", "GET", fixed_path("/v2/health/ready"), _ready
    ),
    "ModelReady": _rpc("ModelReadyRequest", "ModelReadyResponse", "GET", model_route("/ready"), _model_ready),
    "ServerMetadata": _rpc(
        "ServerMetadataRequest", "ServerMetadataResponse", "GET", fixed_path("/v2"), _server_metadata
    ),
    "ModelMetadata": _rpc(
        "ModelMetadataRequest", "ModelMetadataResponse", "GET", model_route(""), _model_metadata
    ),
    "ModelConfig": _rpc(
        "ModelConfigRequest", "ModelConfigResponse", "GET", model_route("/config"), _model_config
    ),
    "ModelStatistics": _rpc(
        "ModelStatisticsRequest", "ModelStatisticsResponse", "GET", statistics_path, _model_statistics
    ),
    "ModelInfer": _rpc("ModelInferRequest", "ModelInferResponse", "POST", infer_path, _model_infer),
}
