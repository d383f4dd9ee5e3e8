"""The jobs API: a request to run later, in the shape of one line of OpenAI's Batch API.

    POST   /v1/jobs        {"method": "POST", "url": "/predict", "body": {...}, "priority": 0-9}
                           (+ Idempotency-Key) → 202 {"id": "job_…", "status": "queued", …}
    GET    /v1/jobs/{id}   status, progress, attempts and, once done, "response": {"status_code", "body"}
    DELETE /v1/jobs/{id}   cancel (a running job stops at its next lease renewal)

A job belongs to its submitter's tenant (or, without one, to its credential): nobody else sees it (404),
except an admin. Everything that can be known at submission is checked then, not when the job runs: the
order parses as the live routes parse JSON (orjson: no NaN, no lone surrogates, no integer past 64 bits
kept as one), the model it names is authorized with the submitter's scopes, is served here and serves
that route, and a generation's body passes the live route's checks. The submitter's tenant may have only
so many unfinished jobs (`[jobs] max_queued_per_tenant`, `max_queued_bytes_per_tenant`; 429 beyond).
Workers run a job through the node's own routes (`run_in_process`), so its answer is the one the live
route would give.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message

from edgegen.errors import InvalidInput, ModelNotFound, validation_message
from edgegen.http.bodies import parse_json
from edgegen.http.responses import json_response
from edgegen.jobs.queue import JOB_ID, Job, JobRequest
from edgegen.node.openai import GENERATION_URLS, validate_generation
from edgegen.node.state import NodeState, node_of
from edgegen.security.auth import Principal, authorize_model, principal_of

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


def _check_target(request: Request, node: NodeState, order: JobCreate) -> None:
    """Refuse now what the job would be refused when it runs: a model the caller may not use (403), one
    this node does not serve (404), a route the model does not serve or a body the route refuses (400)."""
    if order.url in GENERATION_URLS:
        if order.body.get("stream") is True:
            raise InvalidInput("body.stream: a job's answer is kept whole; stream live instead")
        model = validate_generation(order.url, order.body, node.settings.llm).model
    elif order.url.startswith("/models/"):
        model = order.url.split("/")[2]
    else:
        model = node.settings.default_model
    authorize_model(request.scope, model)
    served = node.registry.get(model)
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
        principal.owner, job_request, priority=order.priority, idempotency_key=key
    )
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


async def run_in_process(app: ASGIApp, request: JobRequest, owner: str) -> tuple[int, bytes]:
    """Send a job's request through the node's routes (behind the security gate) and keep the answer."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
        "method": request.method, "path": request.url, "raw_path": request.url.encode(), "query_string": b"",
        "root_path": "", "client": ("job", 0), "server": ("127.0.0.1", 0), "state": {},
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(request.body)).encode())],
        "edgegen.principal": Principal(f"job:{owner}", "user", None, owner),
    }  # fmt: skip
    sent = False
    status, chunks = 500, []

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the job runs until answered or cancelled
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)
