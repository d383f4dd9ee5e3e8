"""OpenAI-compatible generation: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

Non-streaming answers are one JSON object; with `"stream": true` the answer is server-sent events, one
`data: {chunk}` per piece of text and `data: [DONE]` at the end. Errors use OpenAI's shape
(`edgegen.node.errors`). The body is parsed as JSON whatever its Content-Type says, so
`curl -d '{...}'` works as it did with the seed's app. A client that goes away cancels its generation at
the next decode step, freeing its slot.
"""

from __future__ import annotations

import asyncio
import calendar
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.responses import Response, StreamingResponse

from edgegen.engine.generation import Generation, Scheduler
from edgegen.engine.sampling import SamplingParams
from edgegen.errors import ClientGone, InvalidInput
from edgegen.node.state import node_of
from edgegen.node.tensors import parse_json
from edgegen.security.auth import authorize_model, principal_of

router = APIRouter(prefix="/v1", tags=["openai"])
MAX_STOPS = 16


class _Params(BaseModel):
    """What both endpoints share. Unknown fields are ignored, as OpenAI's own API does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    # -1: no seed (llama.cpp's convention, which clients carry over); numpy takes the rest as is.
    seed: Annotated[int, Field(ge=-1, lt=2**64)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return stop

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed if self.seed != -1 else None,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Params):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None


class CompletionRequest(_Params):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def _parse(model: type[_P], body: bytes) -> _P:
    try:
        return model.model_validate(parse_json(body))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise InvalidInput(f"{where}: {error['msg']}" if where else error["msg"]) from None


_P = TypeVar("_P", bound=_Params)


def _scheduler(request: Request, name: str) -> Scheduler:
    authorize_model(request.scope, name)
    served = node_of(request).registry.get(name)
    request.state.model = name
    if served.scheduler is None:
        raise InvalidInput(f"model {name!r} does not generate text; use /v2/models/{name}/infer or /predict")
    return served.scheduler


def _usage(generation: Generation) -> dict[str, Any]:
    usage = generation.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, generation: Generation) -> tuple[str, str]:
    """The whole text and finish reason; cancels the generation if the client leaves first."""

    async def run() -> tuple[str, str]:
        parts, reason = [], "stop"
        async for event in generation.events():
            parts.append(event.text)
            reason = event.finish_reason or reason
        return "".join(parts), reason

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            generation.cancel()
            work.cancel()
    try:
        return await work
    except asyncio.CancelledError:
        if not gone.done() or gone.cancelled():
            raise  # this request itself is being cancelled (shutdown), not the client
        raise ClientGone("the client disconnected; its generation was cancelled") from None


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
    return b"data: " + payload + b"\n\n"


async def _stream(
    generation: Generation, head: dict[str, Any], piece: Any, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE chunks; leaving early (the client went away) cancels the generation."""
    try:
        first = piece(None, None, first=True)
        if first is not None:
            yield _sse({**head, "choices": [first]})
        async for event in generation.events():
            if event.text or event.finish_reason:
                yield _sse({**head, "choices": [piece(event.text, event.finish_reason, first=False)]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(generation)})
        yield _sse("[DONE]")
    except Exception as exc:  # an error after the 200 went out travels as an SSE error event
        message = getattr(exc, "message", "internal error")
        yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
    finally:
        generation.cancel()


def _json(content: dict[str, Any]) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


@router.get("/models", summary="Models that generate text")
async def list_models(request: Request) -> Response:
    registry = node_of(request).registry
    principal = principal_of(request.scope)
    data = []
    for name in registry.names():
        if not principal.allows_model(name):
            continue
        served = registry.get(name)
        if served.scheduler is not None:
            created = calendar.timegm(time.strptime(served.manifest.created, "%Y-%m-%dT%H:%M:%SZ"))
            data.append({"id": name, "object": "model", "created": created, "owned_by": "edgegen"})
    return _json({"object": "list", "data": data})


@router.post("/chat/completions", summary="Chat completion (OpenAI)")
async def chat_completions(request: Request) -> Response:
    body = _parse(ChatRequest, await request.body())
    scheduler = _scheduler(request, body.model)
    executor = scheduler.executor
    chat = executor.render_chat([{"role": m.role, "content": m.text} for m in body.messages])
    prompt = executor.tokenize(chat, special=True)
    generation = _submit(request, scheduler, body, prompt, body.max_completion_tokens or body.max_tokens)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:

        def piece(text: str | None, reason: str | None, *, first: bool) -> dict[str, Any] | None:
            if first:
                return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason}

        return _sse_response(
            generation, {**head, "object": "chat.completion.chunk"}, piece, body.include_usage
        )
    text, reason = await _collect(request, generation)
    message = {"role": "assistant", "content": text}
    return _json(
        {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}],
            "usage": _usage(generation),
        }
    )


@router.post("/completions", summary="Text completion (OpenAI)")
async def completions(request: Request) -> Response:
    body = _parse(CompletionRequest, await request.body())
    scheduler = _scheduler(request, body.model)
    prompt = scheduler.executor.tokenize(body.text, special=False)
    generation = _submit(request, scheduler, body, prompt, body.max_tokens)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:

        def piece(text: str | None, reason: str | None, *, first: bool) -> dict[str, Any] | None:
            if first:
                return None
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        return _sse_response(generation, {**head, "object": "text_completion"}, piece, body.include_usage)
    text, reason = await _collect(request, generation)
    return _json(
        {
            **head,
            "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            "usage": _usage(generation),
        }
    )


def _submit(
    request: Request, scheduler: Scheduler, body: _Params, prompt: list[int], max_tokens: int | None
) -> Generation:
    room = scheduler.executor.n_ctx_seq - len(prompt)
    settings = node_of(request).settings
    return scheduler.submit(
        prompt,
        body.sampling,
        max_tokens=max_tokens if max_tokens is not None else max(room, 1),
        stop=body.stops,
        timeout_s=settings.llm.timeout_s,
    )


def _sse_response(generation: Generation, head: dict[str, Any], piece: Any, include_usage: bool) -> Response:
    return StreamingResponse(
        _stream(generation, head, piece, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
