"""OpenAI-compatible generation: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

Non-streaming answers are one JSON object; with `"stream": true` the answer is server-sent events, one
`data: {chunk}` per piece of text and `data: [DONE]` at the end. Errors use OpenAI's shape
(`edgegen.http.errors`). The body is parsed as JSON whatever its Content-Type says, so
`curl -d '{...}'` works as it did with the seed's app. A client that goes away cancels its generation at
the next decode step, freeing its slot.

Requests are checked before any work: strict JSON types (`"max_tokens": true`, `"stream": "yes"` and
`"temperature": "0.5"` are 400s, as a typed client would never send them), at most `[llm] max_messages`
messages and `[llm] max_prompt_chars` characters of prompt. Rendering the chat and tokenizing it run in
a worker thread (`Scheduler.render_chat`, `Scheduler.encode`), so a long prompt never stalls the event
loop; a message's content is tokenized as plain text, never as control tokens (`engine/prompt.py`).

Fields, beyond OpenAI's sampling ones:
* `ignore_eos` and `min_tokens` (vLLM's and llama.cpp's extensions, which fixed-length benchmarks send):
  end tokens are never sampled, or not before `min_tokens` tokens; a `min_tokens` over the request's
  maximum is a 400. `top_k` and `repetition_penalty` are llama.cpp's.
* On chat, `max_completion_tokens` wins over `max_tokens` when both are given, as on OpenAI.
* `user` (at most 256 characters) and `metadata` (OpenAI's 16 short string pairs) only label the request
  for the caller; they are checked and change nothing.
* `logprobs` (chat: with `top_logprobs` alternatives; completions: a count, and `echo` to score the
  prompt too, `max_tokens` 0 to score it only): the model's own log probabilities
  (`node/openai_logprobs.py`); such a request is never answered from the response cache.
* `response_format` `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema"}}`:
  the answer is drawn under a grammar of that JSON (`executors/llama_grammar.py`), so it parses, and
  validates against the schema, whenever it ends by itself (not cut by `max_tokens` or a stop string).
  A schema the converter cannot express, or too large, is a 400. Not with `ignore_eos` / `min_tokens`.
* `tools` (at most 64 functions, unique names, each one's `parameters` a JSON schema of an object within
  response_format's bounds), `tool_choice` (`"none"`, `"auto"`, `"required"` or one function by name)
  and `parallel_tool_calls` (`node/openai_tools.py`): the tools are rendered with the chat, a forced call
  is drawn under a grammar of the call (then `response_format` does not apply: the answer is the call),
  and calls come back as `message.tool_calls`. A chat carries on after a call with an assistant message
  holding `tool_calls` (`content` null) and a `tool` message per result (`tool_call_id`).
* `n` up to 16 choices: the prompt is computed once and shared (`Scheduler.submit`'s `choice_of`), choice
  i is seeded `seed` + i when a seed is given; streamed chunks carry their choice's `index`, `usage`
  counts the prompt once and every choice's tokens. Several choices are never answered from the cache.
* Fields OpenAI defines that this node does not implement (`NOT_IMPLEMENTED`: `best_of`, `store`,
  `functions`, …) are a 400 naming the field, never dropped in silence, unless
  they hold the value that asks for nothing (null, false, `"none"`, `{"type": "text"}`), which clients
  send by default.
* Any other field is ignored, as OpenAI-compatible servers do, and its name logged (INFO), so a client
  that expects something from it can be found in the log.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from starlette.responses import Response, StreamingResponse

from edgegen.config import LlmSettings
from edgegen.engine.generation import Event, Generation
from edgegen.engine.logprobs import TokenLogprob
from edgegen.engine.registry import ServedModel
from edgegen.engine.sampling import SamplingParams
from edgegen.engine.service import Caller, InferenceService, Replay, Source, TextRequest, caller_of
from edgegen.errors import ClientGone, InvalidInput, validation_message
from edgegen.http.bodies import parse_json
from edgegen.http.responses import json_response
from edgegen.node.openai_logprobs import LogprobWriter, merge_completion
from edgegen.node.openai_tools import (
    MAX_TOOLS,
    CallStream,
    Tool,
    ToolCall,
    ToolChoice,
    ToolUse,
    call_schema,
    choice_among,
    message_of,
    tool_use,
    unique_names,
)
from edgegen.node.state import node_of
from edgegen.security.auth import principal_of

log = logging.getLogger("edgegen.openai")
router = APIRouter(prefix="/v1", tags=["openai"])
MAX_STOPS = 16
# A stop string is held back token by token while the output could still become it: a long one would
# make every token cost as much as the string is long.
MAX_STOP_CHARS = 256
GENERATION_URLS = ("/v1/chat/completions", "/v1/completions")

Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
MAX_USER_CHARS = 256
# OpenAI's bounds on `metadata`.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]
# The names of ignored fields a request's log line carries: a hostile body must not flood the log.
MAX_LOGGED_FIELDS = 8
MAX_LOGGED_NAME = 64
# Choices one request may ask for (`n`): each takes a sequence slot for the whole answer.
MAX_CHOICES = 16


class _JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class _Text(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]


class _JsonObject(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["json_object"]


class _JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["json_schema"]
    json_schema: _JsonSchema


ResponseFormat = Annotated[_Text | _JsonObject | _JsonSchemaFormat, Field(discriminator="type")]


def _one_of(*neutral: Any) -> Callable[[Any], bool]:
    """A test that a value is one of `neutral`, type and all (`0` is not `false`, `1.0` is not `1`)."""
    return lambda value: any(type(value) is type(n) and value == n for n in neutral)


# Fields OpenAI defines that this node does not implement yet: what each asks for, and a test that a
# value asks for nothing (what clients send by default), which passes. Implementing one removes its line.
NOT_IMPLEMENTED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "best_of": ("choosing the best of several answers", _one_of(None, 1)),
    "suffix": ("a suffix", _one_of(None, "")),
    "logit_bias": ("logit bias", _one_of(None, {})),
    "functions": ("function calls", _one_of(None, [])),
    "function_call": ("function calls", _one_of(None, "none")),
    "prediction": ("predicted outputs", _one_of(None)),
    "audio": ("audio output", _one_of(None)),
    "modalities": ("output other than text", _one_of(None, ["text"])),
    "store": ("storing completions", _one_of(None, False)),
}


def _limits(info: ValidationInfo) -> LlmSettings:
    """The node's `[llm]` settings, passed as the validation context (defaults without one)."""
    return info.context if isinstance(info.context, LlmSettings) else LlmSettings()


class _Params(BaseModel):
    """What both endpoints share. Unknown fields are ignored (`validate` logs their names and refuses
    those in `NOT_IMPLEMENTED`); known ones have their JSON type exactly (strict: no `true` for a
    number, no `"0.5"` for a float)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0: only with echo (completions)
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    # -1: no seed (llama.cpp's convention, which clients carry over); numpy takes the rest as is.
    seed: Annotated[int, Field(ge=-1, lt=2**64)] | None = None
    stop: Stop | list[Stop] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    response_format: ResponseFormat | None = None
    user: Annotated[str, Field(max_length=MAX_USER_CHARS)] | None = None
    metadata: Metadata | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return stop

    @property
    def max_new_tokens(self) -> int | None:
        """The most tokens the answer may have (None: the room the prompt leaves)."""
        return self.max_tokens

    @property
    def scores(self) -> int | None:
        """Alternatives each token's log probability lists; None: no log probabilities."""
        return None

    @property
    def echoed(self) -> bool:
        return False

    @property
    def wants_json(self) -> bool:
        return isinstance(self.response_format, _JsonObject | _JsonSchemaFormat)

    @property
    def answer_schema(self) -> dict[str, Any] | None:
        form = self.response_format
        return form.json_schema.schema_ if isinstance(form, _JsonSchemaFormat) else None

    @model_validator(mode="after")
    def _json_may_end(self) -> _Params:
        if self.wants_json and (self.ignore_eos or self.min_tokens):
            raise ValueError(
                "response_format JSON ends where its grammar ends: not with ignore_eos or min_tokens"
            )
        return self

    @model_validator(mode="after")
    def _something_to_do(self) -> _Params:
        if self.max_new_tokens == 0 and not self.echoed:
            raise ValueError("max_tokens 0 asks for nothing (it is accepted with echo, to score the prompt)")
        return self

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
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None  # null only beside tool_calls
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = None  # a tool message's: the call it answers

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @property
    def chars(self) -> int:
        """Characters of the caller's text the message holds."""
        calls = self.tool_calls or ()
        called = sum(len(c.id) + len(c.function.name) + len(c.function.arguments) for c in calls)
        return len(self.text) + called + len(self.tool_call_id or "")

    @model_validator(mode="after")
    def _shaped(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message holds tool_calls")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is missing (it may be null beside tool_calls only)")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a message of role 'tool' needs the tool_call_id of the call it answers")
        return self

    def plain(self) -> dict[str, Any]:
        """The message as the engine renders it: OpenAI's shape, its text parts joined."""
        plain: dict[str, Any] = {"role": self.role, "content": None if self.content is None else self.text}
        if self.tool_calls:
            plain["tool_calls"] = [call.plain() for call in self.tool_calls]
        if self.role == "tool":
            plain["tool_call_id"] = self.tool_call_id
        return plain


MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat


class ChatRequest(_Params):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: true, as on OpenAI

    @property
    def scores(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tools")
    @classmethod
    def _unique(cls, tools: list[Tool] | None) -> list[Tool] | None:
        return unique_names(tools)

    @field_validator("tool_choice")
    @classmethod
    def _among_tools(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        choice_among(choice, info.data.get("tools"))
        return choice

    @property
    def tool_use(self) -> ToolUse | None:
        """What the answer may hold of calls; None: text only."""
        return tool_use(self.tools, self.tool_choice, self.parallel_tool_calls is not False)

    @property
    def forces_call(self) -> bool:
        use = self.tool_use
        return use is not None and use.forced

    @model_validator(mode="after")
    def _call_may_end(self) -> ChatRequest:
        if self.forces_call and (self.ignore_eos or self.min_tokens):
            raise ValueError(
                "a forced tool call ends where its grammar ends: not with ignore_eos or min_tokens"
            )
        return self

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        # OpenAI's newer name wins when a client sends both.
        return self.max_completion_tokens or self.max_tokens

    @field_validator("messages", mode="before")
    @classmethod
    def _few_enough(cls, messages: Any, info: ValidationInfo) -> Any:
        # Counted before a single message is validated: a flood of them is refused at once.
        limit = _limits(info).max_messages
        if isinstance(messages, list) and len(messages) > limit:
            raise ValueError(f"{len(messages)} messages; at most {limit} are accepted")
        return messages

    @model_validator(mode="after")
    def _short_enough(self, info: ValidationInfo) -> ChatRequest:
        tools = sum(len(json.dumps(tool.model_dump(exclude_none=True))) for tool in self.tools or ())
        _check_length(sum(m.chars for m in self.messages) + tools, _limits(info))
        return self


class CompletionRequest(_Params):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False

    @property
    def scores(self) -> int | None:
        return self.logprobs

    @property
    def echoed(self) -> bool:
        return self.echo

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @model_validator(mode="after")
    def _short_enough(self, info: ValidationInfo) -> CompletionRequest:
        _check_length(len(self.text), _limits(info))
        return self


def _check_length(chars: int, limits: LlmSettings) -> None:
    if chars > limits.max_prompt_chars:
        raise ValueError(f"the prompt has {chars} characters; at most {limits.max_prompt_chars} are accepted")


_P = TypeVar("_P", bound=_Params)


def validate(model: type[_P], data: Any, limits: LlmSettings, at: tuple[str, ...] = ()) -> _P:
    """A parsed JSON body as `model`, or InvalidInput naming the first thing wrong with it: its place in
    the body, under `at`, and as the error's `param` the field it is in.

    >>> validate(CompletionRequest, {"model": "m", "prompt": "hi", "best_of": 3}, LlmSettings())
    Traceback (most recent call last):
    edgegen.errors.InvalidInput: best_of: this server does not support choosing the best of several answers
    """
    fields = data if isinstance(data, dict) else {}
    _refuse_unimplemented(fields, at)
    try:
        body = model.model_validate(data, context=limits)
    except ValidationError as exc:
        errors = exc.errors()
        field = errors[0]["loc"][:1] if errors else ()
        param = ".".join(str(part) for part in (*at, *field)) if field else None
        raise InvalidInput(validation_message(errors, at), param=param) from None
    most = body.max_new_tokens
    if most is not None and body.min_tokens > most:
        where = ".".join((*at, "min_tokens"))
        raise InvalidInput(
            f"{where}: {body.min_tokens} is more than the {most} tokens the answer may have", param=where
        )
    _log_ignored(model, fields)
    return body


def _refuse_unimplemented(data: dict[str, Any], at: tuple[str, ...]) -> None:
    for name, (what, asks_nothing) in NOT_IMPLEMENTED.items():
        if name in data and not asks_nothing(data[name]):
            where = ".".join((*at, name))
            raise InvalidInput(f"{where}: this server does not support {what}", param=where)


def _log_ignored(model: type[_Params], data: dict[str, Any]) -> None:
    """Log, once, the names of the fields `model` ignores in `data` (a bounded few, cut short)."""
    ignored = [name for name in data if name not in model.model_fields and name not in NOT_IMPLEMENTED]
    if ignored:
        names = [name[:MAX_LOGGED_NAME] for name in ignored[:MAX_LOGGED_FIELDS]]
        log.info("request fields ignored", extra={"fields": names, "count": len(ignored)})


def validate_generation(
    url: str, data: Any, limits: LlmSettings, at: tuple[str, ...] = ()
) -> ChatRequest | CompletionRequest:
    """The body of a generation for `url` (a job's), checked as the live route checks it; a problem is
    named under `at` (a job's order: "body")."""
    model: type[ChatRequest | CompletionRequest] = (
        ChatRequest if url == "/v1/chat/completions" else CompletionRequest
    )
    return validate(model, data, limits, at=at)


def text_request(body: ChatRequest | CompletionRequest) -> TextRequest:
    """What the inference service generates for `body`."""
    if isinstance(body, ChatRequest):
        use, tools = body.tool_use, body.tools or []
        call = call_schema(tools, use.names) if use is not None and use.forced else None
        return TextRequest(
            body.sampling,
            body.max_new_tokens,
            body.stops,
            messages=[m.plain() for m in body.messages],
            logprobs=body.scores,
            # A forced call is the whole answer: its grammar, not response_format's.
            json=call is not None or body.wants_json,
            schema=call if call is not None else body.answer_schema,
            tools=[tool.model_dump(exclude_none=True) for tool in tools] or None,
            n=body.n,
        )
    # The prompt is scored only when its scores are asked for; its text is echoed here either way.
    echo = body.echo and body.logprobs is not None
    return TextRequest(
        body.sampling,
        body.max_new_tokens,
        body.stops,
        text=body.text,
        logprobs=body.logprobs,
        echo=echo,
        json=body.wants_json,
        schema=body.answer_schema,
        n=body.n,
    )


async def answer(
    service: InferenceService, caller: Caller, body: ChatRequest | CompletionRequest
) -> dict[str, Any]:
    """The whole answer the route gives `body` when it does not stream (a job's answer)."""
    served = service.generator(caller, body.model)
    sources, _ = await _start(service, caller, served, body)
    try:
        wholes = await asyncio.gather(*(_whole_text(source) for source in sources))
    finally:
        for source in sources:
            source.cancel()
    return _whole_answer(_answers(body, served, sources), _head(body), wholes)


_GRAMMAR_FIELD = "response_format: "


async def _start(
    service: InferenceService, caller: Caller, served: ServedModel, body: ChatRequest | CompletionRequest
) -> tuple[list[Source], dict[str, str]]:
    """The generation of `body`'s answer. A forced call's grammar that cannot be built is the tools'
    fault: the converter's complaint (`executors/llama_grammar.py`, which names response_format) is
    told of them."""
    try:
        return await service.generate(caller, served, text_request(body))
    except InvalidInput as exc:
        if isinstance(body, ChatRequest) and body.forces_call and exc.message.startswith(_GRAMMAR_FIELD):
            raise InvalidInput("tools: " + exc.message.removeprefix(_GRAMMAR_FIELD), param="tools") from None
        raise


def _usage(sources: list[Source]) -> dict[str, Any]:
    """The request's tokens: its prompt once (the choices share it), every choice's answer."""
    first = sources[0].usage
    completion = sum(source.usage.completion_tokens for source in sources)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    }


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Whole:
    text: str
    finish_reason: str
    scores: list[TokenLogprob]


async def _whole_text(generation: Source) -> _Whole:
    """The generation's whole text, finish reason and (with logprobs) its tokens' scores."""
    parts, reason, scores = [], "stop", []
    async for event in generation.events():
        parts.append(event.text)
        scores += event.logprobs
        reason = event.finish_reason or reason
    return _Whole("".join(parts), reason, scores)


async def _collect(request: Request, sources: list[Source]) -> list[_Whole]:
    """Every choice's whole answer; cancels the generations if the client leaves first."""
    if len(sources) == 1 and isinstance(replay := sources[0], Replay):
        return [_Whole(replay.text, replay.finish_reason, [])]
    work: asyncio.Future[list[_Whole]] = asyncio.ensure_future(
        asyncio.gather(*(_whole_text(source) for source in sources))
    )
    gone: asyncio.Future[None] = asyncio.ensure_future(_until_disconnected(request))
    try:
        waiting: list[asyncio.Future[Any]] = [work, gone]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            for source in sources:
                source.cancel()
            work.cancel()
    try:
        return list(await work)
    except asyncio.CancelledError:
        if not gone.done() or gone.cancelled():
            raise  # this request itself is being cancelled (shutdown), not the client
        raise ClientGone("the client disconnected; its generation was cancelled") from None


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
    return b"data: " + payload + b"\n\n"


async def _stream(answers: list[_Answer], head: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks, every choice's as they come (each names its index); leaving early (the client went
    away) cancels the generations."""
    sources = [answer.generation for answer in answers]
    try:
        for answer in answers:
            if (opening := answer.opening()) is not None:
                yield _sse({**head, "choices": [opening]})
        started = [False] * len(answers)
        async for index, event in _merged(sources):
            answer = answers[index]
            if not started[index] and (echo := answer.echo()) is not None:  # its prompt's scores are in
                yield _sse({**head, "choices": [echo]})
            started[index] = True
            for choice in answer.pieces(event):
                yield _sse({**head, "choices": [choice]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(sources)})
        yield _sse("[DONE]")
    except Exception as exc:  # an error after the 200 went out travels as an SSE error event
        message = getattr(exc, "message", "internal error")
        yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
    finally:
        for source in sources:
            source.cancel()


async def _merged(sources: list[Source]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several generations as they come, each with its generation's index; the first
    error is raised."""
    if len(sources) == 1:
        async for event in sources[0].events():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, source: Source) -> None:
        try:
            async for event in source.events():
                queue.put_nowait((index, event))
        except Exception as exc:
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    pumps = [asyncio.ensure_future(pump(i, source)) for i, source in enumerate(sources)]
    try:
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()


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
    return json_response({"object": "list", "data": data})


@router.post("/chat/completions", summary="Chat completion (OpenAI)")
async def chat_completions(request: Request) -> Response:
    body = validate(ChatRequest, parse_json(await request.body()), node_of(request).settings.llm)
    return await _generate(request, body)


@router.post("/completions", summary="Text completion (OpenAI)")
async def completions(request: Request) -> Response:
    body = validate(CompletionRequest, parse_json(await request.body()), node_of(request).settings.llm)
    return await _generate(request, body)


async def _generate(request: Request, body: ChatRequest | CompletionRequest) -> Response:
    service, caller = node_of(request).service, caller_of(request.scope)
    served = service.generator(caller, body.model)
    request.state.model = body.model
    sources, headers = await _start(service, caller, served, body)
    head = _head(body)
    answers = _answers(body, served, sources)
    if body.stream:
        kind = "chat.completion.chunk" if isinstance(body, ChatRequest) else "text_completion"
        return _sse_response(answers, {**head, "object": kind}, body.include_usage, headers)
    wholes = await _collect(request, sources)
    return json_response(_whole_answer(answers, head, wholes), headers=headers)


def _answers(
    body: ChatRequest | CompletionRequest, served: ServedModel, sources: list[Source]
) -> list[_Answer]:
    scheduler = served.scheduler
    writer = LogprobWriter(scheduler.executor.piece) if scheduler is not None else None
    return [_Answer(body, writer, source, index) for index, source in enumerate(sources)]


def _whole_answer(answers: list[_Answer], head: dict[str, Any], wholes: list[_Whole]) -> dict[str, Any]:
    """The answer that is not streamed: every choice whole, and the tokens they took."""
    kind = "chat.completion" if answers[0].chat else "text_completion"
    choices = [answer.whole(whole) for answer, whole in zip(answers, wholes, strict=True)]
    return {**head, "object": kind, "choices": choices, "usage": _usage([a.generation for a in answers])}


def _head(body: ChatRequest | CompletionRequest) -> dict[str, Any]:
    prefix = "chatcmpl" if isinstance(body, ChatRequest) else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}


class _Answer:
    """The answer's JSON for one request: whole, or chunk by chunk (a stream keeps its text offset)."""

    def __init__(
        self,
        body: ChatRequest | CompletionRequest,
        writer: LogprobWriter | None,
        generation: Source,
        index: int,
    ):
        self.body = body
        self.writer = writer
        self.generation = generation
        self.index = index  # the choice's
        self.chat = isinstance(body, ChatRequest)
        self._use = body.tool_use if isinstance(body, ChatRequest) else None
        self._calls = CallStream(self._use) if self._use is not None else None
        self._offset = 0  # characters of completion text sent so far

    def whole(self, whole: _Whole) -> dict[str, Any]:
        """The choice that is not streamed: its whole text, and why it ended."""
        if self.chat:
            message, called = message_of(whole.text, self._use)
            return {
                "index": self.index,
                "message": message,
                "finish_reason": "tool_calls" if called else whole.finish_reason,
                "logprobs": self._chat_logprobs(whole.scores),
            }
        echo = self.echo()
        text = (echo["text"] if echo else "") + whole.text
        logprobs = self._text_logprobs(whole.scores)
        if echo is not None and logprobs is not None:
            logprobs = merge_completion([echo["logprobs"], logprobs])
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": whole.finish_reason}

    def opening(self) -> dict[str, Any] | None:
        """A stream's first chunk, before any token: chat's assistant role."""
        if not self.chat:
            return None
        return {
            "index": self.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def echo(self) -> dict[str, Any] | None:
        """With echo (completions): the prompt as a piece of the answer, scored when scores were asked for."""
        body = self.body
        if not isinstance(body, CompletionRequest) or not body.echo:
            return None
        logprobs = None
        if body.logprobs is not None and self.writer is not None and isinstance(self.generation, Generation):
            prompt = self.generation.prompt_tokens
            logprobs = self.writer.completion(self.generation.prompt_logprobs, 0, first=prompt[0])
        self._offset = len(body.text)
        return {"index": self.index, "text": body.text, "logprobs": logprobs, "finish_reason": None}

    def pieces(self, event: Event) -> list[dict[str, Any]]:
        """The streamed chunks' choices one event gives: its text, its tokens' scores, why it ended."""
        if self._calls is not None:
            return self._call_pieces(self._calls, event)
        if not (event.text or event.finish_reason or event.logprobs):
            return []
        return [self._piece(event)]

    def _call_pieces(self, calls: CallStream, event: Event) -> list[dict[str, Any]]:
        """With tools: the text that cannot be a call at once, then at the end what was held back, the
        calls found in it, and why the answer ended."""
        text = calls.feed(event.text)
        choices = []
        if text or event.logprobs:
            choices.append(
                self._delta({"content": text} if text else {}, self._chat_logprobs(event.logprobs))
            )
        if event.finish_reason is None:
            return choices
        tail, found = calls.finish()
        if tail:
            choices.append(self._delta({"content": tail}))
        if found:
            choices.append(
                self._delta({"tool_calls": [{"index": i, **call} for i, call in enumerate(found)]})
            )
        choices.append(self._delta({}, finish_reason="tool_calls" if found else event.finish_reason))
        return choices

    def _delta(
        self, delta: dict[str, Any], logprobs: dict[str, Any] | None = None, finish_reason: str | None = None
    ) -> dict[str, Any]:
        return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def _piece(self, event: Event) -> dict[str, Any]:
        if self.chat:
            delta = {"content": event.text} if event.text else {}
            return self._delta(delta, self._chat_logprobs(event.logprobs), event.finish_reason)
        logprobs = self._text_logprobs(event.logprobs)
        return {
            "index": self.index,
            "text": event.text,
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }

    def _chat_logprobs(self, scores: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.body.scores is None or self.writer is None:
            return None
        return self.writer.chat(scores)

    def _text_logprobs(self, scores: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.body.scores is None or self.writer is None:
            return None
        logprobs = self.writer.completion(scores, self._offset)
        self._offset += sum(len(token) for token in logprobs["tokens"])
        return logprobs


def _sse_response(
    answers: list[_Answer], head: dict[str, Any], include_usage: bool, headers: dict[str, str]
) -> Response:
    return StreamingResponse(
        _stream(answers, head, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
    )
