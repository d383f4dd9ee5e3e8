"""Log probabilities through the `openai` client against a real node, checked against llama.cpp's own logits.

The reference is computed here, in process, with the node's GGUF: the prompt decoded with a row of logits
for every token, then greedy decoding; log-softmax in float64 with numpy (not the node's code).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from edgegen.config import LlmSettings
from edgegen.executors.base import DecodeItem
from edgegen.executors.llamacpp import LlamaExecutor
from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e
MODEL = "tiny-llm"
PROMPT = "the quick brown fox jumps over the lazy dog and then it runs far away into the old forest"
TOLERANCE = 2e-2  # the node decodes the prompt in chunks and other threads: float drift, no more


@pytest.fixture
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0)


def log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def reference(gguf: Path, prompt: str, new: int) -> tuple[list[int], list[float], list[int], list[float]]:
    """Prompt tokens and their log probabilities (from the second), then `new` greedy tokens and theirs."""
    executor = LlamaExecutor(gguf, LlmSettings(max_num_seqs=1, ctx_per_seq=256, threads=1))
    try:
        tokens = executor.tokenize(prompt, special=False)
        rows = [log_softmax(r) for r in executor.decode([DecodeItem(0, tokens, 0, True, every=True)])]
        scored = [float(rows[i][tokens[i + 1]]) for i in range(len(tokens) - 1)]
        generated, logprobs, row, pos = [], [], rows[-1], len(tokens)
        for _ in range(new):
            token = int(np.argmax(row))
            generated.append(token)
            logprobs.append(float(row[token]))
            row = log_softmax(executor.decode([DecodeItem(0, [token], pos, True)])[0])
            pos += 1
        return tokens, scored, generated, logprobs
    finally:
        executor.close()


def test_completion_echo_scores_the_prompt_as_llama_cpp_does(client: openai.OpenAI, node_home: Path) -> None:
    tokens, scored, _generated, logprobs = reference(node_home / "tiny.gguf", PROMPT, 5)
    answer = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3, echo=True
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None
    got = choice.logprobs
    assert got.token_logprobs is not None
    assert got.tokens is not None
    assert got.top_logprobs is not None
    assert len(got.tokens) == len(tokens) + 5
    assert got.token_logprobs[0] is None
    np.testing.assert_allclose(got.token_logprobs[1 : len(tokens)], scored, atol=TOLERANCE)
    np.testing.assert_allclose(got.token_logprobs[len(tokens) :], logprobs, atol=TOLERANCE)
    assert choice.text.startswith(PROMPT)
    assert "".join(got.tokens) == choice.text
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]
    # greedy: each generated token is its row's most likely one, listed first among the 3
    for token, logprob, top in zip(
        got.tokens[len(tokens) :],
        got.token_logprobs[len(tokens) :],
        got.top_logprobs[len(tokens) :],
        strict=True,
    ):
        assert top is not None
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(logprob)
        assert top[token] == pytest.approx(logprob)


def test_max_tokens_zero_with_echo_scores_the_prompt_only(client: openai.OpenAI, node_home: Path) -> None:
    _tokens, scored, _, _ = reference(node_home / "tiny.gguf", PROMPT, 0)
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
    choice = answer.choices[0]
    assert choice.text == PROMPT
    assert choice.finish_reason == "length"
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], scored, atol=TOLERANCE)
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 0


def test_streamed_completion_logprobs_equal_the_whole(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 2, "echo": True}
    whole = client.completions.create(**kw).choices[0]  # type: ignore[call-overload]
    tokens, logprobs, offsets, text = [], [], [], ""
    for chunk in client.completions.create(**kw, stream=True):  # type: ignore[call-overload]
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens or []
            logprobs += choice.logprobs.token_logprobs or []
            offsets += choice.logprobs.text_offset or []
    assert text == whole.text
    assert whole.logprobs is not None
    assert tokens == whole.logprobs.tokens
    assert offsets == whole.logprobs.text_offset
    assert logprobs[0] is None
    np.testing.assert_allclose(logprobs[1:], whole.logprobs.token_logprobs[1:], atol=TOLERANCE)  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_list_each_token_with_its_alternatives(client: openai.OpenAI, stream: bool) -> None:
    kw = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 4,
    }
    if stream:
        content, entries = "", []
        for chunk in client.chat.completions.create(**kw, stream=True):  # type: ignore[call-overload]
            for choice in chunk.choices:
                content += choice.delta.content or ""
                if choice.logprobs is not None and choice.logprobs.content:
                    entries += choice.logprobs.content
    else:
        choice = client.chat.completions.create(**kw).choices[0]  # type: ignore[call-overload]
        content = choice.message.content or ""
        assert choice.logprobs is not None
        assert choice.logprobs.content is not None
        entries = choice.logprobs.content
    assert len(entries) == 10
    assert "".join(e.token for e in entries) == content
    for entry in entries:
        assert bytes(entry.bytes or []).decode(errors="replace") == entry.token
        assert len(entry.top_logprobs) == 4
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert all(
            a.logprob >= b.logprob for a, b in zip(entry.top_logprobs, entry.top_logprobs[1:], strict=False)
        )


@pytest.mark.parametrize(
    ("url", "fields", "param"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"echo": "yes"}, "echo"),
    ],
)
def test_bad_logprob_fields_are_refused(
    node: NodeProcess, url: str, fields: dict[str, object], param: str
) -> None:
    body: dict[str, object] = {"model": MODEL, "max_tokens": 2, **fields}
    if url == "/v1/completions":
        body["prompt"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    response = httpx.post(f"{node.url}{url}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert param in response.json()["error"]["message"]
