"""The seed's protocol: `POST /predict` and `POST /models/{name}/predict`.

    request:  {"input_data": <one sample, nested list>}   (or a list of samples)
    answer:   {"prediction": <the model's first output, batch dimension included>}

As in the seed's Flask app the body is parsed as JSON whatever its Content-Type says.

These two routes carry most of a node's traffic, so they are served straight from ASGI, in front of
the FastAPI app: a framework's request object, dependency resolution and exception middleware cost
more per request here than the model does (see docs/benchmarks.md). Everything else falls through to
FastAPI. The routes still appear in /openapi.json through `OPENAPI_PATHS`.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from edgegen.engine.registry import ServedModel
from edgegen.engine.service import Caller, InferenceService, caller_of
from edgegen.errors import EdgegenError, InvalidInput
from edgegen.http.bodies import parse_json, read_body
from edgegen.http.errors import render
from edgegen.node.state import NodeState
from edgegen.node.tensors import to_batch

log = logging.getLogger("edgegen.errors")
PREFIX, SUFFIX = "/models/", "/predict"
JSON_HEADERS = [(b"content-type", b"application/json")]


async def respond(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if headers:
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class PredictRoutes:
    """ASGI middleware: answers the seed's routes itself and hands every other request to `app`."""

    def __init__(self, app: ASGIApp, node: NodeState) -> None:
        self.app = app
        self.node = node

    def _route(self, path: str) -> tuple[str, str] | None:
        """(route template, model name) when `path` is one of the seed's routes."""
        if path == SUFFIX:
            return SUFFIX, self.node.settings.default_model
        if path.startswith(PREFIX) and path.endswith(SUFFIX):
            name = path[len(PREFIX) : -len(SUFFIX)]
            if name and "/" not in name:
                return PREFIX + "{name}" + SUFFIX, name
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._route(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["edgegen.route"] = route[0]
        if scope["method"] != "POST":
            await respond(send, 405, orjson.dumps({"error": "method not allowed"}), {"Allow": "POST"})
            return
        try:
            body, headers = await self._predict(scope, receive, route[1])
        except EdgegenError as exc:
            status, error, headers = render(exc)
            await respond(send, status, error, headers)
            return
        except Exception:
            log.exception("unhandled error")
            await respond(send, 500, orjson.dumps({"error": "internal error"}))
            return
        await respond(send, 200, body, headers)

    async def _predict(self, scope: Scope, receive: Receive, name: str) -> tuple[bytes, dict[str, str]]:
        service, caller = self.node.service, caller_of(scope)
        served = service.model(caller, name)
        scope.setdefault("state", {})["model"] = name
        return await prediction(service, caller, served, parse_json(await read_body(receive)))


async def prediction(
    service: InferenceService, caller: Caller, served: ServedModel, payload: Any
) -> tuple[bytes, dict[str, str]]:
    """The seed's answer to a parsed body, `{"prediction": ...}` as JSON, and the headers that say where
    it came from (the route's, and a queued job's)."""
    served.fixed_shape()
    manifest = served.manifest
    if len(manifest.inputs) != 1:
        raise InvalidInput(
            f"model {manifest.name!r} takes several inputs; use /v2/models/{manifest.name}/infer"
        )
    if not isinstance(payload, dict) or "input_data" not in payload:
        raise InvalidInput('the body must be a JSON object with an "input_data" list')
    spec = manifest.inputs[0]
    batch = to_batch(payload["input_data"], spec)
    outputs, headers = await service.predict(caller, served, {spec.name: batch})
    body = orjson.dumps({"prediction": outputs[manifest.outputs[0].name]}, option=orjson.OPT_SERIALIZE_NUMPY)
    return body, headers


_OPERATION: dict[str, Any] = {
    "tags": ["seed"],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["input_data"],
                    "properties": {
                        "input_data": {
                            "type": "array",
                            "description": "one sample without the batch dimension, or a list of samples",
                        }
                    },
                },
                "example": {"input_data": [0.0] * 64},
            }
        },
    },
    "responses": {
        "200": {"description": '{"prediction": [[...]]}: the first output, batch dimension included'},
        "400": {"description": '{"error": "..."}: wrong shape or dtype, NaN/Inf, not JSON'},
        "404": {"description": "unknown model"},
        "413": {"description": "body too large"},
        "503": {"description": "queue full; see Retry-After"},
        "504": {"description": "deadline passed"},
    },
}
OPENAPI_PATHS: dict[str, Any] = {
    "/predict": {
        "post": {**_OPERATION, "summary": "Predict with the node's default model", "operationId": "predict"}
    },
    "/models/{name}/predict": {
        "post": {
            **_OPERATION,
            "summary": "Predict with a named model",
            "operationId": "predict_model",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        }
    },
}
