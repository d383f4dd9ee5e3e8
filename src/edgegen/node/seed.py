"""The seed's protocol: `POST /predict` and `POST /models/{name}/predict`.

    request:  {"input_data": <one sample, nested list>}   (or a list of samples)
    answer:   {"prediction": <the model's first output, batch dimension included>}

As in the seed's Flask app the body is parsed as JSON whatever its Content-Type says.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from edgegen.errors import InvalidInput
from edgegen.node.state import node_of
from edgegen.node.tensors import parse_json, to_batch

router = APIRouter(tags=["seed"])

_BODY = {
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
        "200": {"description": '{"prediction": [[...]]}'},
        "400": {"description": '{"error": "..."} — wrong shape, dtype, NaN/Inf, not JSON'},
        "404": {"description": "unknown model"},
        "413": {"description": "body too large"},
        "503": {"description": "overloaded, see Retry-After"},
    },
}


async def _predict(request: Request, name: str) -> Response:
    node = node_of(request)
    served = node.registry.get(name)
    request.state.model = name
    manifest = served.manifest
    if len(manifest.inputs) != 1:
        raise InvalidInput(f"model {name!r} takes several inputs; use /v2/models/{name}/infer")
    payload = parse_json(await request.body())
    if not isinstance(payload, dict) or "input_data" not in payload:
        raise InvalidInput('the body must be a JSON object with an "input_data" list')
    spec = manifest.inputs[0]
    batch = to_batch(payload["input_data"], spec)
    outputs = await served.batcher.submit({spec.name: batch}, node.settings.request_timeout_s)
    prediction = outputs[manifest.outputs[0].name]
    return Response(
        orjson.dumps({"prediction": prediction}, option=orjson.OPT_SERIALIZE_NUMPY),
        media_type="application/json",
    )


@router.post("/predict", openapi_extra=_BODY, summary="Predict with the node's default model")
async def predict(request: Request) -> Response:
    return await _predict(request, node_of(request).settings.default_model)


@router.post("/models/{name}/predict", openapi_extra=_BODY, summary="Predict with a named model")
async def predict_model(name: str, request: Request) -> Response:
    return await _predict(request, name)
