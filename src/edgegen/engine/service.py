"""The one door from a route (or a job) to a model, in the manner of TGI's `Infer`.

    caller = caller_of(scope)                        who asks, and what its Cache-Control allows
    served = service.fixed_shape(caller, name)       authorized, served here, takes tensors
    outputs, headers = await service.predict(caller, served, feeds)
    served = service.generator(caller, name)         authorized, served here, generates text
    sources, headers = await service.generate(caller, served, TextRequest(...))   one per choice

A route parses its protocol into these calls and encodes what they give back; nothing else stands
between it and the engine. The service decides, for tensors and text alike, once: whether the caller
may use the model, whether the response cache answers (a `Replay`) or a new answer is computed (and,
when it may be cached, recorded as it is produced), and where the work goes — the model's dynamic
batcher, or its generation scheduler, which renders a chat in the model's template and tokenizes the
prompt off the event loop.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import orjson

from edgegen.cache import Directives, ResponseCache, Ticket, directives
from edgegen.cache.keys import decode_tensors, encode_tensors, generation_key, tensors_key
from edgegen.engine.generation import Event, Generation, Scheduler, Usage
from edgegen.engine.prompt import Prompt, text_prompt
from edgegen.engine.registry import ModelRegistry, ServedModel
from edgegen.engine.sampling import SamplingParams
from edgegen.errors import Forbidden, InvalidInput, Unloaded
from edgegen.observe import tracing
from edgegen.security.auth import Principal, principal_of

ANY_USE = Directives()  # a request without Cache-Control: the cache may answer it and keep its answer


@dataclass(frozen=True)
class Caller:
    """Who asks (its model scope and tenant), and what its request lets the response cache do."""

    principal: Principal
    cache: Directives = ANY_USE


def caller_of(scope: Mapping[str, Any]) -> Caller:
    """The caller of an HTTP request: the principal the security gate left in its scope, and its
    Cache-Control."""
    return Caller(principal_of(scope), directives(scope))


@dataclass(frozen=True)
class TextRequest:
    """A generation: a chat (`messages`, rendered by the model's template) or a completion's `text`."""

    params: SamplingParams
    max_tokens: int | None = None  # None: the room the prompt leaves in a sequence's context
    stops: Sequence[str] = ()
    messages: Sequence[Mapping[str, Any]] | None = None  # OpenAI's shape, `tool_calls` and `tool` ones too
    text: str = ""
    logprobs: int | None = None  # score the answer's tokens, with this many alternatives each
    echo: bool = False  # score the prompt's tokens too; max_tokens 0: only them
    json: bool = False  # the answer is JSON: an object, or valid under `schema`
    schema: Mapping[str, Any] | None = None
    tools: Sequence[Mapping[str, Any]] | None = None  # OpenAI's tool definitions, rendered with the chat
    n: int = 1  # choices: the prompt computed once, each choice seeded seed + i (when seeded)


class Replay:
    """A generation answered from the response cache: its whole text as one event."""

    def __init__(self, cached: bytes) -> None:
        data = orjson.loads(cached)
        self.text: str = data["text"]
        self.finish_reason: str = data["finish_reason"]
        prompt = int(data["prompt_tokens"])
        self.usage = Usage(prompt, int(data["completion_tokens"]), cached_tokens=prompt)

    async def events(self) -> AsyncIterator[Event]:
        yield Event(self.text, self.finish_reason)

    def cancel(self) -> None:
        pass


class Recorded:
    """A generation whose finished text is stored in the response cache."""

    def __init__(self, generation: Generation, done: Callable[[bytes], None]) -> None:
        self._generation = generation
        self._done = done

    @property
    def usage(self) -> Usage:
        return self._generation.usage

    async def events(self) -> AsyncIterator[Event]:
        parts = []
        async for event in self._generation.events():
            parts.append(event.text)
            if event.finish_reason is not None:
                usage = self.usage
                self._done(
                    orjson.dumps(
                        {
                            "text": "".join(parts),
                            "finish_reason": event.finish_reason,
                            "prompt_tokens": usage.prompt_tokens,
                            "completion_tokens": usage.completion_tokens,
                        }
                    )
                )
            yield event

    def cancel(self) -> None:
        self._generation.cancel()


Source = Generation | Replay | Recorded  # what a generation's events and usage are read from


class InferenceService:
    def __init__(
        self,
        registry: ModelRegistry,
        cache: ResponseCache | None,
        *,
        request_timeout_s: float,
        generation_timeout_s: float,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.request_timeout_s = request_timeout_s
        self.generation_timeout_s = generation_timeout_s

    # -- which model ------------------------------------------------------------------------------
    def model(self, caller: Caller, name: str) -> ServedModel:
        """`name` as this node serves it, once the caller may use it (403 before 404: a caller learns
        nothing of models outside its scope)."""
        if not caller.principal.allows_model(name):
            raise Forbidden(f"this credential may not use model {name!r}")
        return self.registry.get(name)

    def fixed_shape(self, caller: Caller, name: str) -> ServedModel:
        served = self.model(caller, name)
        served.fixed_shape()
        return served

    def generator(self, caller: Caller, name: str) -> ServedModel:
        served = self.model(caller, name)
        if served.scheduler is None:
            raise InvalidInput(
                f"model {name!r} does not generate text; use /v2/models/{name}/infer or /predict"
            )
        return served

    def _successor(self, caller: Caller, served: ServedModel, unloaded: Unloaded) -> ServedModel:
        """The version that serves `served`'s model now that `served` was closed before it took a
        request (a swap while the request's body arrived or its prompt was tokenized); `unloaded` again
        when none does but it (the node stops)."""
        current = self.model(caller, served.manifest.name)  # ModelNotFound: removed meanwhile
        if current is served:
            raise unloaded
        return current

    # -- the work ---------------------------------------------------------------------------------
    async def predict(
        self, caller: Caller, served: ServedModel, feeds: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """A fixed-shape model's outputs for `feeds` — from the response cache when it has them — and
        the headers that say where they came from. A version closed before it took them (replaced
        meanwhile) hands them to the version that replaced it."""
        try:
            return await self._predict(caller, served, feeds)
        except Unloaded as exc:
            return await self._predict(caller, self._successor(caller, served, exc), feeds)

    async def _predict(
        self, caller: Caller, served: ServedModel, feeds: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        batcher = served.fixed_shape()
        ticket = self._ticket(
            caller, served, functools.partial(_tensors_key, feeds=feeds), deterministic=True
        )
        if ticket is None:
            return await batcher.submit(feeds, self.request_timeout_s), {}
        started = time.perf_counter_ns()
        if (cached := self._lookup(ticket)) is not None:
            outputs = decode_tensors(cached)
            batcher.cached(True, time.perf_counter_ns() - started)  # (Triton's statistics)
            return outputs, ticket.headers
        looked = time.perf_counter_ns() - started
        try:
            outputs = await batcher.submit(feeds, self.request_timeout_s)
        except BaseException:
            batcher.cached(False, looked)  # a miss all the same, with nothing to keep
            raise
        started = time.perf_counter_ns()
        self._store(ticket, encode_tensors(outputs))
        batcher.cached(False, looked + time.perf_counter_ns() - started)
        return outputs, ticket.headers

    async def generate(
        self, caller: Caller, served: ServedModel, request: TextRequest
    ) -> tuple[list[Source], dict[str, str]]:
        """The answer's sources, one per choice — the response cache, or new generations (recorded when
        the answer may be cached) — and the headers that say which. The cache key holds the prompt's
        text, not its tokens: a hit skips tokenizing (llama.cpp's tokenizer is the dearest part of a
        hit). Several choices are never cached: each is a draw of its own. A version closed before its
        generations were queued (replaced while the prompt was rendered or tokenized) hands the request
        to the version that replaced it, which renders and tokenizes it anew (its tokenizer may differ)."""
        try:
            return await self._generate(caller, served, request)
        except Unloaded as exc:
            return await self._generate(caller, self._successor(caller, served, exc), request)

    async def _generate(
        self, caller: Caller, served: ServedModel, request: TextRequest
    ) -> tuple[list[Source], dict[str, str]]:
        scheduler = served.scheduler
        if scheduler is None:
            raise InvalidInput(f"model {served.manifest.name!r} does not generate text")
        n_ctx = scheduler.executor.n_ctx_seq
        if request.max_tokens is not None and request.max_tokens >= n_ctx:
            # Refused before the prompt is rendered or tokenized: no prompt would fit beside it.
            raise InvalidInput(
                f"max_tokens {request.max_tokens} leaves no room for a prompt "
                f"in the context of {n_ctx} tokens"
            )
        prompt = await self._prompt(scheduler, request)
        params = request.params

        def key(owner: str, model: str, tag: str) -> bytes:
            fields: dict[str, Any] = asdict(params)
            if request.json:
                fields["json"] = request.schema or True
            if request.tools:
                fields["tools"] = request.tools
            return generation_key(owner, model, tag, prompt, fields, request.max_tokens, n_ctx, request.stops)

        deterministic = params.greedy or params.seed is not None
        # The cache keeps text, not scores: a request for scores is always computed.
        scored = request.logprobs is not None or request.echo
        cacheable = not scored and request.n == 1
        ticket = self._ticket(caller, served, key, deterministic=deterministic) if cacheable else None
        if ticket is not None and (cached := self._lookup(ticket)) is not None:
            return [Replay(cached)], ticket.headers
        # A grammar follows one answer as it grows: each choice has its own.
        grammars = (
            [await scheduler.json_grammar(request.schema) for _ in range(request.n)] if request.json else []
        )
        tokens = await scheduler.encode(prompt)
        budget = request.max_tokens if request.max_tokens is not None else max(n_ctx - len(tokens), 1)
        generations: list[Generation] = []
        try:
            for i in range(request.n):
                seeded = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
                generations.append(
                    scheduler.submit(
                        tokens,
                        seeded,
                        max_tokens=budget,
                        stop=request.stops,
                        timeout_s=self.generation_timeout_s,
                        tenant=caller.principal.owner,
                        logprobs=request.logprobs,
                        echo=request.echo,
                        grammar=grammars[i] if grammars else None,
                        choice_of=generations[0] if generations else None,
                    )
                )
        except Exception:
            for generation in generations:  # a choice refused (the queue is full): none of them runs
                generation.cancel()
            raise
        if ticket is None:
            return list(generations), {}
        if ticket.write:
            return [Recorded(generations[0], functools.partial(self._store, ticket))], ticket.headers
        return list(generations), ticket.headers

    @staticmethod
    async def _prompt(scheduler: Scheduler, request: TextRequest) -> Prompt:
        if request.messages is None:
            return text_prompt(request.text)
        return await scheduler.render_chat(request.messages, request.tools)

    # -- the response cache -----------------------------------------------------------------------
    def _ticket(
        self,
        caller: Caller,
        served: ServedModel,
        key: Callable[[str, str, str], bytes],
        *,
        deterministic: bool,
    ) -> Ticket | None:
        if self.cache is None:
            return None
        owner = caller.principal.owner
        return self.cache.ticket(owner, caller.cache, served.manifest, key, deterministic=deterministic)

    def _lookup(self, ticket: Ticket) -> bytes | None:
        assert self.cache is not None  # (a ticket comes from it)
        if (tracer := tracing.tracer) is None:
            return self.cache.lookup(ticket)
        span = tracer.span("cache.lookup")
        try:
            found = self.cache.lookup(ticket)
            span.set_attribute("edgegen.cache_hit", found is not None)
            return found
        finally:
            span.end()

    def _store(self, ticket: Ticket, value: bytes) -> None:
        assert self.cache is not None
        self.cache.store(ticket, value)


def _tensors_key(owner: str, model: str, tag: str, *, feeds: Mapping[str, np.ndarray]) -> bytes:
    return tensors_key(owner, model, tag, feeds)
