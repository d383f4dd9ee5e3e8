"""OpenAI-compatible generation against a real node serving a tiny llama.cpp model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from edgegen.executors import describe_model
from edgegen.store import ModelStore
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import NodeProcess, metric, running
from tests.llm_models import write_tiny_llama

pytestmark = pytest.mark.e2e
MODEL = "tiny-llm"


@pytest.fixture
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, content: str, **kw: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        **kw,  # type: ignore[arg-type]
    )


def test_models_lists_the_language_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_completion_with_usage(client: openai.OpenAI) -> None:
    answer = chat(client, "the quick brown fox", max_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12


def test_streamed_text_equals_the_non_streamed_text(client: openai.OpenAI) -> None:
    whole = chat(client, "hello world", max_tokens=20, temperature=0).choices[0].message.content
    stream = chat(
        client,
        "hello world",
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == whole
    assert reasons[-1] == "length"
    assert usage is not None
    assert usage.completion_tokens == 20

    text = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=16, temperature=0)
    streamed = client.completions.create(
        model=MODEL, prompt="once upon a time", max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def test_the_same_seed_gives_the_same_text(client: openai.OpenAI) -> None:
    texts = [
        chat(client, "tell me", max_tokens=24, temperature=1.5, top_p=0.95, seed=seed)
        .choices[0]
        .message.content
        for seed in (7, 7, 8)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_eight_parallel_greedy_streams_match_one_at_a_time(node: NodeProcess) -> None:
    prompts = [f"story number {i} about the brown fox" for i in range(8)]
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0}

    def alone(prompt: str) -> str:
        return httpx.post(f"{node.url}/v1/completions", json={**body, "prompt": prompt}, timeout=60).json()[
            "choices"
        ][0]["text"]

    expected = [alone(p) for p in prompts]

    async def together() -> list[str]:
        async with httpx.AsyncClient(base_url=node.url, timeout=60) as http:
            answers = await asyncio.gather(
                *(http.post("/v1/completions", json={**body, "prompt": p}) for p in prompts)
            )
        return [a.json()["choices"][0]["text"] for a in answers]

    assert asyncio.run(together()) == expected


def test_a_shared_prefix_is_served_from_the_cache(client: openai.OpenAI) -> None:
    system = "you are a helpful assistant who answers in short sentences about the quick brown fox " * 3
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "first"}]
    cold = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    messages[1]["content"] = "second question"
    warm = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert warm.usage is not None
    assert cold.usage is not None
    cached = warm.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached >= cold.usage.prompt_tokens - 8


def test_curl_without_content_type_streams(node: NodeProcess) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is edge computing?"}],
        "stream": True,
        "max_tokens": 8,
    }
    result = subprocess.run(
        ["curl", "-sN", f"{node.url}/v1/chat/completions", "-d", json.dumps(body)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    events = [line[len("data: ") :] for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


RUNNING = f'edgegen_sequences{{model="{MODEL}",state="running"}}'
GENERATED = f'edgegen_generated_tokens_total{{model="{MODEL}"}}'


def wait_idle(node: NodeProcess) -> None:
    until = time.monotonic() + 5
    while metric(node, RUNNING) != 0 and time.monotonic() < until:
        time.sleep(0.02)
    assert metric(node, RUNNING) == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_sequence(node: NodeProcess, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 1900, "stream": stream, "temperature": 0}
    before = metric(node, GENERATED)
    if stream:
        with (
            httpx.Client(timeout=30) as http,
            http.stream("POST", f"{node.url}/v1/completions", json=body) as response,
        ):
            assert next(response.iter_lines()).startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{node.url}/v1/completions", json=body, timeout=0.3)
    wait_idle(node)
    assert metric(node, GENERATED) - before < 1900  # stopped early, not run to max_tokens


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": -5}, 400, "max_tokens"),
        ({"max_tokens": 100_000}, 400, "context"),
        ({"n": 17}, 400, "n"),
        ({"temperature": -1}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"top_p": 1.5}, 400, "top_p"),
        ({"model": "nope"}, 404, "not served"),
        ({"model": "digits"}, 400, "does not generate"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "the fox " * 2100}]}, 400, "context"),
        ({"stop": ["x"] * 100}, 400, "stop"),
        ({"max_tokens": "ten"}, 400, "max_tokens"),
        ({"temperature": "hot"}, 400, "temperature"),
        ({"stream": "yes please"}, 400, "stream"),
        ({"seed": -2}, 400, "seed"),  # schemathesis found a negative seed to be a 500
        ({"seed": 2**64}, 400, "seed"),
    ],
)
def test_bad_requests_get_openai_errors(
    node: NodeProcess, body: dict[str, object], status: int, fragment: str
) -> None:
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    response = httpx.post(f"{node.url}/v1/chat/completions", json=request)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    # and the node still answers a good request
    good = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{node.url}/v1/chat/completions", json=good).status_code == 200


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"model": "tiny-llm", "prompt": "\xff\xfe"}', 400),
        (b"not json", 400),
        (b'{"model": "tiny-llm", "prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}', 413),
    ],
)
def test_malformed_bodies(node: NodeProcess, content: bytes, status: int) -> None:
    response = httpx.post(f"{node.url}/v1/completions", content=content, timeout=30)
    assert response.status_code == status
    assert "message" in response.json()["error"]


def test_openai_client_surfaces_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="top_p"):
        chat(client, "hi", top_p=2.0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_a_full_waiting_queue_answers_429_with_retry_after(node: NodeProcess) -> None:
    """8 slots and 16 waiting places (conftest's LLM_ENV): of 40 long requests at once, some are refused."""
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 200, "temperature": 0}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=node.url, timeout=300) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(40)))

    responses = asyncio.run(flood())
    refused = [r for r in responses if r.status_code == 429]
    assert refused
    assert all(r.headers["retry-after"] for r in refused)
    assert refused[0].json()["error"]["type"] == "rate_limit_error"
    assert all(r.status_code in (200, 429) for r in responses)
    assert sum(r.status_code == 200 for r in responses) >= 16  # every request that got a place was served
    wait_idle(node)


def test_a_version_activated_mid_stream_lets_the_stream_end_whole(tmp_path: Path) -> None:
    """Another version of the language model activated while a chat streams (what a rollout does on each
    node): the old version finishes the chat, every token of it and `[DONE]`, and only then is freed; the
    new version serves from the swap on. Before, the swap ended the stream with an error event, "was
    unloaded", the old version's model freed under it."""
    store = ModelStore(tmp_path / "models", describe=describe_model)
    store.add(write_tiny_llama(tmp_path / "tiny.gguf"), MODEL, "1", task="text-generation")
    node = NodeProcess(tmp_path, env={"EDGEGEN_STORE_POLL_S": "0.2", **LLM_ENV})
    # Greedy: the tiny model never ends early. 1,500 tokens outlast the swap on a loaded machine.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1500,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with (
        running(node),
        httpx.stream("POST", f"{node.url}/v1/chat/completions", json=body, timeout=120) as answer,
    ):
        lines = answer.iter_lines()
        events = [next(line for line in lines if line.startswith("data: "))]  # it streams
        cli = [sys.executable, "-m", "edgegen", "models"]
        second = [str(write_tiny_llama(tmp_path / "tiny-2.gguf")), "--name", MODEL, "--version", "2"]
        subprocess.run([*cli, "add", *second, "--task", "text-generation"], env=node.env, check=True)
        subprocess.run([*cli, "activate", MODEL, "2"], env=node.env, check=True)
        until = time.monotonic() + 30
        while httpx.get(f"{node.url}/v2/models/{MODEL}/versions/2/ready").status_code != 200:
            assert time.monotonic() < until, "the node did not take version 2"
            time.sleep(0.05)
        swapped = len(events)
        events += [line for line in lines if line.startswith("data: ")]
        assert httpx.get(f"{node.url}/v2/models/{MODEL}/versions/1/ready").status_code == 404
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert events[-1] == "data: [DONE]"
    assert not any("error" in chunk for chunk in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 1500
    assert swapped < len(events) - 2  # the swap came while it streamed, not after its end
