"""The jobs API: a request to run later, in the shape of one line of OpenAI's Batch API.

    POST   /v1/jobs        {"method": "POST", "url": "/predict", "body": {...}, "priority": 0-9}
                           (+ Idempotency-Key) → 202 {"id": "job_…", "status": "queued", …}
    GET    /v1/jobs/{id}   status, progress, attempts and, once done, "response": {"status_code", "body"}
    DELETE /v1/jobs/{id}   cancel (a running job stops at its next lease renewal)

A job belongs to its submitter's tenant (or, without one, to its credential): nobody else sees it (404),
except an admin. Everything that can be known at submission is checked then: the order parses as the live
routes parse JSON (orjson: no NaN, no lone surrogates, no integer past 64 bits kept as one), the model it
names is authorized with the submitter's scopes, is served here and serves that route, and a generation's
body passes the live route's checks. The submitter's tenant may have only so many unfinished jobs
(`[jobs] max_queued_per_tenant`, `max_queued_bytes_per_tenant`; 429 beyond).

A job keeps its submitter's principal, and its scope is decided again when it runs (`runs_as`): an API key
as its record reads then — narrowed, it no longer reaches the model it lost; revoked, nothing; moved to
another tenant, none of its old tenant's jobs — and any other credential as it was checked. A job its
credential may no longer run ends with the 403 the live route would answer, recorded as any 4xx answer is
(a failed job with that answer), without reaching the model. Workers run the others through the inference
service as that principal, with the routes' own parsing and encoding (`predict.prediction`,
`openai.answer`), so a job's answer is the one the live route would give.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from edgegen.config import Settings
from edgegen.engine.service import Caller, InferenceService, caller_of
from edgegen.errors import (
    EdgegenError,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    error_body,
    is_openai,
    validation_message,
)
from edgegen.http.bodies import parse_json
from edgegen.http.errors import render
from edgegen.http.responses import json_response
from edgegen.jobs.queue import JOB_ID, Job, JobRequest
from edgegen.node import openai, predict
from edgegen.node.openai import GENERATION_URLS, validate_generation
from edgegen.node.state import NodeState, node_of
from edgegen.observe import tracing
from edgegen.security.auth import Principal, current_principal, principal_of
from edgegen.security.keys import KeyStore

log = logging.getLogger("edgegen.jobs")
router = APIRouter(prefix="/v1", tags=["jobs"])
URLS = re.compile(
    r"^(/v1/chat/completions|/v1/completions|/predict|/models/[a-z0-9][a-z0-9._-]{0,63}/predict)$"
)
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,255}$")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    method: Literal["POST"]
    url: str = Field(
        pattern=URLS.pattern,
        description="/v1/chat/completions, /v1/completions, /predict, /models/{name}/predict",
    )
    body: dict[str, Any]
    priority: int = Field(0, ge=0, le=9)


def view(job: Job) -> dict[str, Any]:
    response = None
    if job.response_status is not None:
        try:
            body = orjson.loads(job.response_body or b"null")
        except orjson.JSONDecodeError:
            body = (job.response_body or b"").decode(errors="replace")
        response = {"status_code": job.response_status, "body": body}
    return {
        "id": job.id,
        "object": "job",
        "status": job.status.value,
        "priority": job.priority,
        "attempts": job.attempts,
        "progress": job.progress,
        "created": job.created,
        "updated": job.updated,
        "request": {"method": job.request.method, "url": job.request.url},
        "response": response,
        "error": job.error,
    }


def model_of(url: str, body: Mapping[str, Any], default_model: str) -> str:
    """The model a job's order names: a generation's in its body, a prediction's in its URL, else the
    node's default ("" for a body that names none: no credential is scoped to it, the route refuses it).

    >>> model_of("/models/digits/predict", {}, "seed")
    'digits'
    """
    if url in GENERATION_URLS:
        model = body.get("model")
        return model if isinstance(model, str) else ""
    if url.startswith("/models/"):
        return url.split("/")[2]
    return default_model


def _check_target(request: Request, node: NodeState, order: JobCreate) -> None:
    """Refuse now what the job would be refused when it runs: a model the caller may not use (403), one
    this node does not serve (404), a route the model does not serve or a body the route refuses (400)."""
    if order.url in GENERATION_URLS:
        if order.body.get("stream") is True:
            raise InvalidInput("body.stream: a job's answer is kept whole; stream live instead")
        validate_generation(order.url, order.body, node.settings.llm, at=("body",))
    model = model_of(order.url, order.body, node.settings.default_model)
    served = node.service.model(caller_of(request.scope), model)
    if order.url in GENERATION_URLS and served.scheduler is None:
        raise InvalidInput(f"model {model!r} does not generate text; use /predict or /models/{model}/predict")
    if order.url not in GENERATION_URLS:
        served.fixed_shape()
        if "input_data" not in order.body:
            raise InvalidInput('body: a prediction holds "input_data", one sample or a list of samples')


def _canonical(body: dict[str, Any]) -> bytes:
    """The body as the job will send it, keys sorted (idempotency compares these bytes)."""
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:  # orjson's JSONEncodeError, and its recursion limit: nested past 254 levels
        raise InvalidInput(f"body: {exc}") from None


@router.post("/jobs", status_code=202, summary="Queue a request to run later")
async def create(request: Request) -> Response:
    node = node_of(request)
    if node.jobs is None:
        raise InvalidInput("this node runs no jobs")
    try:
        # Parsed as the live routes parse (orjson), then checked: pydantic's own JSON parser would keep
        # integers past 64 bits, which orjson cannot write back.
        order = JobCreate.model_validate(parse_json(await request.body()))
    except ValidationError as exc:
        raise InvalidInput(f"invalid job: {validation_message(exc.errors())}") from None
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise InvalidInput("Idempotency-Key: 1-255 characters of letters, digits, . _ : -")
    principal = principal_of(request.scope)
    _check_target(request, node, order)
    job_request = JobRequest(order.method, order.url, _canonical(order.body))
    job, created = await node.jobs.submit(
        principal.owner, job_request, principal=principal, priority=order.priority, idempotency_key=key,
        traceparent=tracing.submitter(request.headers.get("traceparent")),
    )  # fmt: skip
    if created and node.job_workers is not None:
        node.job_workers.notify()
    return json_response(view(job), 202 if created else 200)


async def _own(request: Request, job_id: str) -> Job:
    node = node_of(request)
    if not JOB_ID.match(job_id):
        raise InvalidInput("a job id reads job_ and 24 hex digits")
    job = await node.jobs.get(job_id) if node.jobs is not None else None
    principal = principal_of(request.scope)
    if job is None or (job.owner != principal.owner and not principal.at_least("admin")):
        raise ModelNotFound(f"no job {job_id}")  # another tenant's job is as absent as a missing one
    return job


@router.get("/jobs/{job_id}", summary="A job's status and, once done, its answer")
async def status(job_id: str, request: Request) -> Response:
    return json_response(view(await _own(request, job_id)))


@router.delete("/jobs/{job_id}", summary="Cancel a job")
async def cancel(job_id: str, request: Request) -> Response:
    job = await _own(request, job_id)
    assert node_of(request).jobs is not None
    cancelled = await node_of(request).jobs.cancel(job.id)  # type: ignore[union-attr]
    return json_response(view(cancelled or job))


def runs_as(job: Job, keys: KeyStore | None, default_model: str) -> Principal:
    """The principal `job` runs with, decided now from the one that submitted it (its API key looked up
    again in `keys`); Forbidden when its credential may no longer run it."""
    if job.principal is None:
        raise Forbidden("this job was queued before its submitter was kept with it; submit it again")
    principal = current_principal(job.principal, keys)
    if principal is None:
        raise Forbidden("the API key that queued this job was revoked")
    if principal.owner != job.owner:
        raise Forbidden("the API key that queued this job belongs to another tenant now")
    url, body = job.request.url, job.request.body
    model = model_of(url, orjson.loads(body) if url in GENERATION_URLS else {}, default_model)
    if not principal.allows_model(model):
        raise Forbidden(f"this credential may not use model {model!r}")
    return principal


async def run_job(
    service: InferenceService, keys: KeyStore | None, settings: Settings, job: Job
) -> tuple[int, bytes]:
    """Answer `job` as the live route would answer its submitter now (status and JSON body): through the
    inference service as `runs_as` says, or the route's 403 when its credential may no longer run it."""
    url = job.request.url
    try:
        caller = Caller(runs_as(job, keys, settings.default_model))
        data = parse_json(job.request.body)
        if url in GENERATION_URLS:
            body = validate_generation(url, data, settings.llm)
            return 200, orjson.dumps(await openai.answer(service, caller, body))
        served = service.model(caller, model_of(url, data, settings.default_model))
        return 200, (await predict.prediction(service, caller, served, data))[0]
    except EdgegenError as exc:
        status, error, _ = render(exc, is_openai(url))
        return status, error
    except Exception:
        log.exception("job failed", extra={"job": job.id})
        return 500, error_body("internal error", 500, is_openai(url))
