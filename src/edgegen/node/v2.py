"""KServe v2 / Open Inference Protocol, with Triton's binary tensor, model configuration and statistics
extensions (the last two in Triton's JSON: node/triton.py).

JSON tensors carry `data` as a flat (or nested) row-major list. With the binary extension, the body is
a JSON header of `Inference-Header-Content-Length` bytes followed by the raw little-endian bytes of
each input that has `parameters.binary_data_size`, in order; outputs come back the same way when
the request asks for `binary_data` (this is what `tritonclient.http` sends by default).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from edgegen import __version__
from edgegen.engine.registry import ServedModel
from edgegen.engine.service import caller_of
from edgegen.errors import EdgegenError, InvalidInput, ModelNotFound
from edgegen.http.bodies import parse_json, read_body
from edgegen.http.datatypes import NUMPY_TYPES
from edgegen.http.errors import render
from edgegen.http.responses import json_response
from edgegen.node import triton
from edgegen.node.predict import respond
from edgegen.node.state import NodeState, node_of
from edgegen.node.tensors import cast
from edgegen.security.auth import Principal, principal_of
from edgegen.store import Manifest, TensorSpec

log = logging.getLogger("edgegen.errors")
router = APIRouter(prefix="/v2", tags=["kserve-v2"])

PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tensorflowlite", "gguf": "llama.cpp_gguf"}
HEADER_LENGTH = b"inference-header-content-length"
JSON = (b"content-type", b"application/json")


def _tensor_meta(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": NUMPY_TYPES.get(spec.dtype, spec.dtype.upper()),
        "shape": spec.shape,
    }


def served_model(node: NodeState, scope: Scope, name: str, version: str | None) -> ServedModel:
    """Model `name` (at `version`, when given) as the caller of `scope` may use it; the model is noted in
    the scope for the request's metrics and access line."""
    served = node.service.model(caller_of(scope), name)
    if version is not None and version != served.manifest.version:
        raise ModelNotFound(f"version {version!r} of model {name!r} is not served here")
    scope.setdefault("state", {})["model"] = name
    return served


def _served(request: Request, name: str, version: str | None) -> ServedModel:
    return served_model(node_of(request), request.scope, name, version)


@router.get("/health/live", summary="The process is up")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="Every model is loaded")
async def ready(request: Request) -> Response:
    is_ready = node_of(request).registry.ready
    return json_response({"ready": is_ready}, 200 if is_ready else 503)


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    # The software's version is an operator's business (it tells which known flaws a node has).
    return json_response(server_description(principal_of(request.scope)))


def server_description(principal: Principal) -> dict[str, Any]:
    # The software's version is an operator's business (it tells which known flaws a node has).
    version = __version__ if principal.at_least("operator") else ""
    return {"name": "edgegen", "version": version, "extensions": triton.EXTENSIONS}


def metadata(node: NodeState, manifest: Manifest) -> dict[str, Any]:
    return {
        "name": manifest.name,
        "versions": node.store.versions(manifest.name),
        "platform": PLATFORMS[manifest.format],
        "inputs": [_tensor_meta(s) for s in manifest.inputs],
        "outputs": [_tensor_meta(s) for s in manifest.outputs],
    }


def _metadata(request: Request, manifest: Manifest) -> Response:
    return json_response(metadata(node_of(request), manifest))


def statistics(served: ServedModel) -> dict[str, Any]:
    """A model's `$model_stat`. A text model answers no KServe inference (/infer refuses it; /metrics
    counts its generations), so its counts are zeros, in the same shape."""
    batcher = served.batcher
    stats = batcher.statistics() if batcher is not None else triton.IDLE
    return triton.model_statistics(served.manifest.name, served.manifest.version, stats)


# Before /models/{name}, which would take "stats" for a model's name.
@router.get("/models/stats", summary="Statistics of every model (Triton's statistics extension)")
async def all_statistics(request: Request) -> Response:
    """Every served model this credential may use; the others are left out, as if not served."""
    return json_response(every_statistics(node_of(request), principal_of(request.scope)))


def every_statistics(node: NodeState, principal: Principal) -> dict[str, Any]:
    registry = node.registry
    served = [registry.get(n) for n in registry.names() if principal.allows_model(n)]
    return {"model_stats": [statistics(s) for s in served]}


@router.get("/models/{name}", summary="Model metadata")
async def model_metadata(name: str, request: Request) -> Response:
    return _metadata(request, _served(request, name, None).manifest)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata")
async def model_version_metadata(name: str, version: str, request: Request) -> Response:
    return _metadata(request, _served(request, name, version).manifest)


@router.get("/models/{name}/ready", summary="Model readiness")
async def model_ready(name: str, request: Request) -> Response:
    _served(request, name, None)
    return json_response({"name": name, "ready": True})


@router.get("/models/{name}/versions/{version}/ready", summary="Model version readiness")
async def model_version_ready(name: str, version: str, request: Request) -> Response:
    _served(request, name, version)
    return json_response({"name": name, "ready": True})


def configuration(served: ServedModel) -> dict[str, Any]:
    """Triton's model configuration (node/triton.py).

    A text (GGUF) model is refused with a 400 that says what it is and where to send it, rather than
    described: /infer refuses it (it generates through /v1), so any configuration (its tokens and
    logits, or the BYTES text_input/text_output of Triton's generate extension) would send perf_analyzer
    on to requests that all fail. tritonclient raises the 400 as an InferenceServerException carrying
    that message, and perf_analyzer stops at once with it ("failed to get model config: …").
    """
    batcher = served.fixed_shape()
    manifest = served.manifest
    inputs = [_tensor_meta(s) for s in manifest.inputs]
    outputs = [_tensor_meta(s) for s in manifest.outputs]
    return triton.model_config(manifest, PLATFORMS[manifest.format], inputs, outputs, batcher)


def _config(request: Request, name: str, version: str | None) -> Response:
    return json_response(configuration(_served(request, name, version)))


@router.get("/models/{name}/config", summary="Model configuration (Triton's extension)")
async def model_config(name: str, request: Request) -> Response:
    return _config(request, name, None)


@router.get("/models/{name}/versions/{version}/config", summary="Model version configuration")
async def model_version_config(name: str, version: str, request: Request) -> Response:
    return _config(request, name, version)


@router.get("/models/{name}/stats", summary="Model statistics (Triton's extension)")
async def model_statistics(name: str, request: Request) -> Response:
    return json_response({"model_stats": [statistics(_served(request, name, None))]})


@router.get("/models/{name}/versions/{version}/stats", summary="Model version statistics")
async def model_version_statistics(name: str, version: str, request: Request) -> Response:
    return json_response({"model_stats": [statistics(_served(request, name, version))]})


def _split_body(given: bytes | None, body: bytes) -> tuple[bytes, bytes]:
    """The JSON header and the binary section of a body whose header is `given` bytes long (None: all
    JSON)."""
    if given is None:
        return body, b""
    # bytes.isdigit() is ASCII only (str.isdigit() also takes "²", which int() refuses).
    if not given.isdigit() or int(given) > len(body):
        raise InvalidInput("inference-header-content-length must be a byte count within the body")
    return body[: int(given)], body[int(given) :]


def input_spec(
    name: Any, shape: Any, datatype: Any, specs: dict[str, TensorSpec]
) -> tuple[str, list[int], np.dtype[Any]]:
    """The name, shape and dtype of one request input, once they fit the model's (KServe over HTTP and
    gRPC alike)."""
    if not isinstance(name, str) or name not in specs:
        raise InvalidInput(f"unknown input {name!r}; the model's inputs are {sorted(specs)}")
    spec = specs[name]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of integers")
    fits = len(shape) == len(spec.shape) and all(
        d >= 0 and s in (-1, d) for d, s in zip(shape, spec.shape, strict=True)
    )
    if not fits:
        raise InvalidInput(f"input {name!r}: shape {shape} does not match the model's {list(spec.shape)}")
    if datatype != NUMPY_TYPES.get(spec.dtype):
        raise InvalidInput(
            f"input {name!r}: datatype must be {NUMPY_TYPES.get(spec.dtype)}, got {datatype!r}"
        )
    return name, shape, np.dtype(spec.dtype)


def from_bytes(name: str, data: bytes | memoryview, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray:
    """An input given as its raw little-endian bytes (Triton's binary extension, gRPC's raw contents)."""
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: {len(data)} bytes do not match its shape {shape}")
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"input {name!r} holds a value that is not finite")
    return array.reshape(shape)


def from_values(name: str, data: Any, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray:
    """An input given as a list of values (JSON's `data`, gRPC's typed contents)."""
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input {name!r}: data must be a list of numbers") from None
    if raw.dtype.kind not in ("b" if dtype.kind == "b" else "iuf"):
        raise InvalidInput(f"input {name!r}: data must hold {NUMPY_TYPES[dtype.name]} values")
    count = math.prod(shape)
    if raw.size != count:
        raise InvalidInput(f"input {name!r}: data holds {raw.size} values, its shape needs {count}")
    array = raw.astype(dtype) if dtype.kind == "b" else cast(raw, dtype, f"input {name!r}")
    return array.reshape(shape)


def check_feeds(feeds: dict[str, np.ndarray], specs: dict[str, TensorSpec]) -> None:
    """What a whole request's inputs must be: each given, and one batch of at least one sample."""
    if missing := set(specs) - set(feeds):
        raise InvalidInput(f"missing inputs {sorted(missing)}")
    if len({a.shape[0] for a in feeds.values() if a.ndim}) > 1:
        raise InvalidInput("all inputs must have the same batch size")
    if any(a.ndim == 0 or a.shape[0] == 0 for a in feeds.values()):
        raise InvalidInput("inputs must hold at least one sample")


def _input(
    item: Any, specs: dict[str, TensorSpec], binary: memoryview, offset: int
) -> tuple[np.ndarray, int]:
    """Decode one request input; return the array and the new offset into the binary section."""
    if not isinstance(item, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype and data")
    name, shape, dtype = input_spec(item.get("name"), item.get("shape"), item.get("datatype"), specs)
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"input {name!r}: parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInput(f"input {name!r}: binary_data_size does not match its shape and the body")
        return from_bytes(name, binary[offset : offset + size], dtype, shape), offset + size
    data = item.get("data")
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: data must be a list (or use binary_data_size)")
    return from_values(name, data, dtype, shape), offset


def _requested_outputs(header: dict[str, Any], manifest: Manifest) -> list[tuple[str, bool]]:
    parameters = header.get("parameters") or {}
    binary_default = bool(isinstance(parameters, dict) and parameters.get("binary_data_output", False))
    wanted = header.get("outputs")
    names = [o.name for o in manifest.outputs]
    if wanted is None:
        return [(n, binary_default) for n in names]
    if not isinstance(wanted, list):
        raise InvalidInput("outputs must be a list")
    chosen = []
    for item in wanted:
        if not isinstance(item, dict) or item.get("name") not in names:
            raise InvalidInput(f"unknown output {item!r}; the model's outputs are {names}")
        item_parameters = item.get("parameters") or {}
        binary = (
            item_parameters.get("binary_data", binary_default) if isinstance(item_parameters, dict) else False
        )
        chosen.append((item["name"], bool(binary)))
    return chosen


async def infer_answer(
    node: NodeState, scope: Scope, served: ServedModel, body: bytes
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The answer to an inference request's `body` (JSON, or Triton's binary form when its
    `Inference-Header-Content-Length` says so), and its headers: where it came from (the cache), its
    content type and the length of its JSON part."""
    served.fixed_shape()
    manifest = served.manifest
    given = next((v for k, v in scope["headers"] if k == HEADER_LENGTH), None)
    head, binary = _split_body(given, body)
    header = parse_json(head)
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidInput('the body must be a JSON object with an "inputs" list')
    specs = {s.name: s for s in manifest.inputs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    view = memoryview(binary)
    for item in header["inputs"]:
        array, offset = _input(item, specs, view, offset)
        if item["name"] in feeds:
            raise InvalidInput(f"input {item['name']!r} is given twice")
        feeds[item["name"]] = array
    check_feeds(feeds, specs)
    if offset != len(binary):
        raise InvalidInput("the binary section is longer than the inputs declare")
    requested = _requested_outputs(header, manifest)
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("id must be a string")

    outputs, told = await node.service.predict(caller_of(scope), served, feeds)

    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out_name, as_binary in requested:
        array = outputs[out_name]
        entry: dict[str, Any] = {
            "name": out_name,
            "datatype": NUMPY_TYPES[array.dtype.name],
            "shape": list(array.shape),
        }
        if as_binary:
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.ravel()
        described.append(entry)
    answer: dict[str, Any] = {
        "model_name": manifest.name,
        "model_version": manifest.version,
        "outputs": described,
    }
    if request_id is not None:
        answer["id"] = request_id
    head_out = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    headers = [(k.lower().encode(), v.encode()) for k, v in told.items()]
    if not chunks:
        return head_out, [*headers, JSON]
    split = [(b"content-type", b"application/octet-stream"), (HEADER_LENGTH, str(len(head_out)).encode())]
    return head_out + b"".join(chunks), headers + split


class InferRoutes:
    """`POST /v2/models/{name}[/versions/{v}]/infer`, straight from ASGI in front of the FastAPI app, for
    the reason node/predict.py gives: a framework's request object, routing and middleware cost more per
    request than a small model does. Every other request goes on to `app`. The routes appear in
    /openapi.json through `OPENAPI_PATHS`."""

    def __init__(self, app: ASGIApp, node: NodeState) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _INFER.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        name, version = match.groups()
        scope["edgegen.route"] = INFER_ROUTES[version is not None]
        if scope["method"] != "POST":
            await respond(send, 405, orjson.dumps({"error": "method not allowed"}), {"Allow": "POST"})
            return
        try:
            served = served_model(self.node, scope, name, version)
            body, headers = await infer_answer(self.node, scope, served, await read_body(receive))
        except EdgegenError as exc:
            status, error, told = render(exc)
            await respond(send, status, error, told)
            return
        except Exception:
            log.exception("unhandled error")
            await respond(send, 500, orjson.dumps({"error": "internal error"}))
            return
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
INFER_ROUTES = {False: "/v2/models/{name}/infer", True: "/v2/models/{name}/versions/{version}/infer"}
_EXAMPLE = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
_OPERATION: dict[str, Any] = {
    "tags": ["kserve-v2"],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"example": _EXAMPLE},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Triton's binary tensors: a JSON header of Inference-Header-Content-Length "
                "bytes, then each input's raw little-endian bytes",
            },
        },
    },
    "responses": {
        "200": {"description": '{"model_name", "model_version", "outputs": [...]} (binary outputs after it)'},
        "400": {"description": '{"error": "..."}: a shape, datatype or value the model does not take'},
        "404": {"description": "unknown model or version"},
        "503": {"description": "queue full; see Retry-After"},
        "504": {"description": "deadline passed"},
    },
}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
OPENAPI_PATHS: dict[str, Any] = {
    INFER_ROUTES[False]: {
        "post": {**_OPERATION, "summary": "Inference", "operationId": "infer", "parameters": [_NAME]}
    },
    INFER_ROUTES[True]: {
        "post": {
            **_OPERATION,
            "summary": "Inference on a version",
            "operationId": "infer_version",
            "parameters": [_NAME, _VERSION],
        }
    },
}
