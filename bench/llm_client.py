"""A streaming OpenAI-chat client for the LLM benchmark: N concurrent SSE streams started at once.

Each stream is one `POST /v1/chat/completions` with `"stream": true`, read line by line with httpx
(async); the arrival time of every `data:` chunk that carries content is kept. TTFT is the time from
just before the request is sent to the first chunk with non-empty `delta.content`.

How many tokens a stream generated: `usage.completion_tokens` when the server sends usage (ours does,
with `stream_options.include_usage`); else `max_tokens` when it finished for "length"; else the number
of content chunks (llama-cpp-python sends one per token, but may merge a few when it holds text back).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass
class Stream:
    """What one request saw."""

    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # perf_counter at each content chunk
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    tokens: int = 0
    token_source: str = ""

    @property
    def ttft_s(self) -> float:
        return self.times[0] - self.sent

    @property
    def decode_tps(self) -> float:
        """Per-stream decode rate: (tokens − 1) ÷ (last − first token time)."""
        span = self.times[-1] - self.times[0]
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else 0.0

    @property
    def cached_tokens(self) -> int | None:
        """Prompt tokens the server found in its prefix cache, when it says (ours does, in `usage`)."""
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return details.get("cached_tokens")

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


@dataclass
class Wave:
    """N streams started together."""

    started: float
    streams: list[Stream]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def wall_s(self) -> float:
        return max(s.times[-1] for s in self.streams) - self.started

    @property
    def aggregate_tps(self) -> float:
        """All generated tokens ÷ wall time from the first request sent to the last token received."""
        return self.tokens / self.wall_s


def chat_body(model: str, system: str, user: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def new_client(connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0), trust_env=False)


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Stream:
    """Send one streaming chat request and record when each piece of content arrives."""
    stream = Stream(sent=time.perf_counter())
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue  # blank separators, SSE comments and pings
            data = line[6:]
            if data == "[DONE]":
                break
            _take_chunk(stream, orjson.loads(data), time.perf_counter())
    _count_tokens(stream, body["max_tokens"])
    if not stream.times:
        raise RuntimeError(f"{url}: the stream carried no content")
    return stream


def _take_chunk(stream: Stream, chunk: dict[str, Any], now: float) -> None:
    if "error" in chunk:
        raise RuntimeError(f"error event in the stream: {chunk['error']}")
    if chunk.get("usage"):
        stream.usage = chunk["usage"]
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            stream.times.append(now)
            stream.text.append(content)
        if choice.get("finish_reason"):
            stream.finish_reason = choice["finish_reason"]


def _count_tokens(stream: Stream, max_tokens: int) -> None:
    if stream.usage and stream.usage.get("completion_tokens"):
        stream.tokens, stream.token_source = int(stream.usage["completion_tokens"]), "usage"
    elif stream.finish_reason == "length":
        stream.tokens, stream.token_source = max_tokens, "length"
    else:
        stream.tokens, stream.token_source = len(stream.times), "chunks"


async def wave(client: httpx.AsyncClient, url: str, bodies: list[dict[str, Any]]) -> Wave:
    """Start one stream per body at once and wait for them all."""
    started = time.perf_counter()
    streams = await asyncio.gather(*(stream_chat(client, url, body) for body in bodies))
    return Wave(started, list(streams))
