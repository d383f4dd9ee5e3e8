"""`response_format` through the official `openai` client against a real node: every answer that ends by
itself parses, and validates against its own schema, with 8 streams of different schemas at once."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.node_process import NodeProcess
from tests.json_shapes import conforms

pytestmark = pytest.mark.e2e
MODEL = "tiny-llm"


@pytest.fixture
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0)


def schema_for(i: int) -> dict[str, Any]:
    """A schema of its own per request: a word only it may say, a count, and a list."""
    return {
        "type": "object",
        "properties": {
            "word": {"enum": [f"w{i}", f"v{i}"]},
            "count": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        },
        "required": ["word", "count", "tags"],
        "additionalProperties": False,
    }


def ask(client: openai.OpenAI, i: int, *, stream: bool, temperature: float) -> tuple[str, str | None]:
    kw: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"describe item {i}"}],
        "max_tokens": 200,
        "temperature": temperature,
        "seed": i,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": f"item_{i}", "schema": schema_for(i), "strict": True},
        },
    }
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        return choice.message.content or "", choice.finish_reason
    text, reason = "", None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_concurrent_answers_each_validate_against_their_own_schema(
    client: openai.OpenAI, temperature: float
) -> None:
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda i: ask(client, i, stream=i % 2 == 0, temperature=temperature), range(24))
        )
    for i, (text, reason) in enumerate(answers):
        assert reason == "stop", (i, text)
        value = json.loads(text)
        assert conforms(value, schema_for(i)), (i, value)
        assert value["word"] in (f"w{i}", f"v{i}")


def test_json_object_mode_answers_an_object(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "anything"}],
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)


def test_a_cached_free_text_answer_is_not_served_for_a_json_request(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "the same question"}]
    free = [
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        for _ in range(2)
    ]
    assert free[0].choices[0].message.content == free[1].choices[0].message.content
    shaped = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=200, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(shaped.choices[0].message.content or ""), dict)


def test_completions_take_a_response_format_too(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model=MODEL,
        prompt="a list:",
        max_tokens=100,
        temperature=0,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "l",
                    "schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
                },
            }
        },
    )
    value = json.loads(answer.choices[0].text)
    assert isinstance(value, list)
    assert all(isinstance(v, int) for v in value)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "wat"}},
                }
            },
            "schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "minItems": 10**6}},
                }
            },
            "minItems",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "name"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
            "name",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens"),
        ({"response_format": "json"}, "response_format"),
    ],
)
def test_a_bad_response_format_is_a_400_and_the_node_serves_on(
    node: NodeProcess, client: openai.OpenAI, fields: dict[str, Any], words: str
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    response = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]
    ok = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.choices[0].finish_reason == "length"
