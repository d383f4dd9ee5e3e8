"""`n` choices through the `openai` client against a real node: the prompt computed once, each choice the
answer its own seed gives (seed + index), streamed and whole, on both endpoints."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.e2e.node_process import NodeProcess, metric

pytestmark = pytest.mark.e2e
MODEL = "tiny-llm"
PROMPT = "the cat sat on the mat and looked at the"
PROMPT_TOKENS = 'edgegen_prompt_tokens_total{model="tiny-llm"}'
REUSED_TOKENS = 'edgegen_prefix_cache_hit_tokens_total{model="tiny-llm"}'
SAMPLED = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 12}


@pytest.fixture
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0)


def _chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], **kw)


def _streamed_chat(client: openai.OpenAI, **kw: Any) -> tuple[dict[int, str], dict[int, str], Any]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in _chat(client, stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def test_each_chat_choice_is_what_its_seed_gives_alone(client: openai.OpenAI) -> None:
    together = _chat(client, n=3, seed=40, **SAMPLED)
    assert [c.index for c in together.choices] == [0, 1, 2]
    alone = [_chat(client, n=1, seed=40 + i, **SAMPLED).choices[0] for i in range(3)]
    assert [c.message.content for c in together.choices] == [c.message.content for c in alone]
    assert len({c.message.content for c in together.choices}) > 1  # three draws, not one thrice
    # The usage: the prompt once, every choice's tokens.
    single = _chat(client, n=1, seed=40, **SAMPLED).usage
    assert together.usage.prompt_tokens == single.prompt_tokens
    completion = sum(_chat(client, n=1, seed=40 + i, **SAMPLED).usage.completion_tokens for i in range(3))
    assert together.usage.completion_tokens == completion


def test_streamed_choices_arrive_interleaved_by_index(client: openai.OpenAI) -> None:
    texts, reasons, usage = _streamed_chat(client, n=3, seed=7, **SAMPLED)
    whole = _chat(client, n=3, seed=7, **SAMPLED)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_completion_choices_with_logprobs(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt=PROMPT, n=2, seed=3, logprobs=2, **SAMPLED)
    for choice in answer.choices:
        assert choice.logprobs is not None
        assert "".join(choice.logprobs.tokens or []) == choice.text
    alone = client.completions.create(model=MODEL, prompt=PROMPT, n=1, seed=4, **SAMPLED)
    assert answer.choices[1].text == alone.choices[0].text
    stream = client.completions.create(model=MODEL, prompt=PROMPT, n=2, seed=3, stream=True, **SAMPLED)
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {c.index: c.text for c in answer.choices}


def test_greedy_choices_are_the_same_answer(client: openai.OpenAI) -> None:
    answer = _chat(client, n=2, temperature=0, max_tokens=10)
    assert answer.choices[0].message.content == answer.choices[1].message.content


def test_the_choices_prompt_is_computed_once(node: NodeProcess, client: openai.OpenAI) -> None:
    prompt = "a long prompt that no other test sends, " * 20  # no cached prefix to start from
    received, reused = metric(node, PROMPT_TOKENS), metric(node, REUSED_TOKENS)
    answer = client.completions.create(model=MODEL, prompt=prompt, n=4, temperature=1.0, max_tokens=4)
    assert answer.usage is not None
    prompt_tokens = answer.usage.prompt_tokens
    assert metric(node, PROMPT_TOKENS) - received == 4 * prompt_tokens  # four sequences began with it
    # three of them took all but its last token from the first one's cells
    assert metric(node, REUSED_TOKENS) - reused == 3 * (prompt_tokens - 1)


@pytest.mark.parametrize(("n", "fragment"), [(0, "n"), (17, "n"), (True, "n"), ("2", "n"), (2.0, "n")])
def test_a_bad_n_is_a_bad_request_and_the_node_keeps_serving(
    node: NodeProcess, n: object, fragment: str
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": n, "max_tokens": 2}
    answer = httpx.post(f"{node.url}/v1/chat/completions", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == fragment
    ok = httpx.post(f"{node.url}/v1/chat/completions", json={**body, "n": 2})
    assert ok.status_code == 200
    assert len(ok.json()["choices"]) == 2
