"""The OpenAI request surface on a real node, through the official client (streamed and not): fields the
node does not implement are a 400 naming them, loose types are refused by name, the labels clients send
are taken, unknown fields are ignored and logged, and `ignore_eos` / `min_tokens` decide when an answer
may end.

The plain tiny model never ends an answer by itself (its end tokens are suppressed, tests/llm_models.py),
so the tests of `ignore_eos` and `min_tokens` serve `eager-eos` beside it: the same model with its end
token made the likeliest at every step, so that without them every answer ends at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gguf import GGUFReader

from edgegen.executors import describe_model
from edgegen.store import ModelStore
from tests.e2e.node_process import NodeProcess
from tests.llm_models import BIAS_CHANNEL, EOS_ID, SUPPRESSED_LOGIT, write_tiny_llama

pytestmark = pytest.mark.e2e
MODEL, EAGER = "tiny-llm", "eager-eos"
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]
FUNCTIONS = [{"name": "f", "parameters": {"type": "object"}}]  # OpenAI's deprecated form of tools
STREAMED = pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
ENDPOINTS = pytest.mark.parametrize("endpoint", ["chat", "completions"])


def write_eager_eos(path: Path) -> Path:
    """The tiny model whose end token `<|im_end|>` has the largest logit at every step: its unembedding
    row reads the constant bias channel with +30 where the plain model has -30 (tests/llm_models.py)."""
    write_tiny_llama(path)
    reader = GGUFReader(path, "r+")
    [output] = [t for t in reader.tensors if t.name == "output.weight"]
    output.data[EOS_ID, BIAS_CHANNEL] = -SUPPRESSED_LOGIT
    reader.data.flush()
    return path


@pytest.fixture(scope="module")
def node_home(node_home: Path) -> Path:
    """conftest's home, with eager-eos served beside tiny-llm."""
    store = ModelStore(node_home / "models", describe=describe_model)
    store.add(write_eager_eos(node_home / "eager-eos.gguf"), EAGER, task="text-generation")
    return node_home


@pytest.fixture
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0)


def create(client: openai.OpenAI, endpoint: str, **kw: Any) -> Any:
    """A chat or a completion of the same text, from tiny-llm unless `model` says otherwise."""
    kw = {"model": MODEL, **kw}
    if endpoint == "chat":
        return client.chat.completions.create(messages=MESSAGES, **kw)  # type: ignore[arg-type]
    return client.completions.create(prompt="the quick brown fox", **kw)


def answer(client: openai.OpenAI, endpoint: str, stream: bool, **kw: Any) -> tuple[int, str]:
    """Greedy from eager-eos: the answer's completion tokens and finish reason."""
    kw = {"model": EAGER, "temperature": 0, **kw}
    if not stream:
        whole = create(client, endpoint, **kw)
        return whole.usage.completion_tokens, whole.choices[0].finish_reason
    reasons, tokens = [], -1
    for chunk in create(client, endpoint, stream=True, stream_options={"include_usage": True}, **kw):
        reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    [reason] = reasons
    return tokens, reason


@STREAMED
@ENDPOINTS
def test_without_ignore_eos_the_eager_model_ends_at_once(
    client: openai.OpenAI, endpoint: str, stream: bool
) -> None:
    assert answer(client, endpoint, stream, max_tokens=64) == (0, "stop")


@STREAMED
@ENDPOINTS
def test_ignore_eos_runs_the_answer_to_max_tokens(client: openai.OpenAI, endpoint: str, stream: bool) -> None:
    assert answer(client, endpoint, stream, max_tokens=64, extra_body={"ignore_eos": True}) == (64, "length")


@STREAMED
@ENDPOINTS
def test_min_tokens_holds_the_end_back_that_long(client: openai.OpenAI, endpoint: str, stream: bool) -> None:
    assert answer(client, endpoint, stream, max_tokens=64, extra_body={"min_tokens": 10}) == (10, "stop")


def test_ignore_eos_still_stops_at_a_stop_string(client: openai.OpenAI) -> None:
    kw = {"model": EAGER, "max_tokens": 64, "temperature": 0, "extra_body": {"ignore_eos": True}}
    free = create(client, "completions", **kw)
    stop = free.choices[0].text[20:24]
    stopped = create(client, "completions", stop=[stop], **kw)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free.choices[0].text[: free.choices[0].text.index(stop)]


@ENDPOINTS
def test_min_tokens_over_max_tokens_is_refused_with_both_numbers(
    client: openai.OpenAI, endpoint: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=r"min_tokens: 65 .* 64 ") as caught:
        create(client, endpoint, max_tokens=64, extra_body={"min_tokens": 65})
    assert caught.value.param == "min_tokens"


REFUSED = [
    ("chat", "functions", FUNCTIONS),
    ("chat", "function_call", "auto"),
    ("chat", "logit_bias", {"42": 10}),
    ("chat", "store", True),
    ("completions", "best_of", 2),
    ("completions", "suffix", "the end"),
]


@STREAMED
@pytest.mark.parametrize(("endpoint", "field", "value"), REFUSED)
def test_a_field_the_node_does_not_implement_is_a_bad_request_naming_it(
    client: openai.OpenAI, endpoint: str, field: str, value: object, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError, match=f"{field}: this server does not support") as caught:
        create(client, endpoint, max_tokens=4, stream=stream, **{field: value})
    assert caught.value.param == field


def test_the_refusal_has_openai_error_shape(node: NodeProcess) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "functions": FUNCTIONS}
    response = httpx.post(f"{node.url}/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "functions: this server does not support function calls",
            "type": "invalid_request_error",
            "param": "functions",
            "code": None,
        }
    }


@ENDPOINTS
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", True),
        ("stream", "yes"),
        ("temperature", "0.5"),
        ("ignore_eos", 1),
        ("min_tokens", 1.5),
        ("user", 5),
    ],
)
def test_loose_types_are_refused_by_name(node: NodeProcess, endpoint: str, field: str, value: object) -> None:
    url, base = (
        ("/v1/chat/completions", {"messages": MESSAGES})
        if endpoint == "chat"
        else ("/v1/completions", {"prompt": "hi"})
    )
    response = httpx.post(f"{node.url}{url}", json={"model": MODEL, "max_tokens": 4, **base, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field
    assert error["message"].startswith(f"{field}: ")


@STREAMED
def test_the_values_clients_send_by_default_pass(client: openai.OpenAI, stream: bool) -> None:
    chat = create(
        client,
        "chat",
        max_tokens=4,
        stream=stream,
        user="alice@example.com",
        metadata={"team": "search"},
        store=False,
        n=1,
        logprobs=False,
        tool_choice="none",
        parallel_tool_calls=False,
        response_format={"type": "text"},
        modalities=["text"],
    )
    text = create(client, "completions", max_tokens=4, stream=stream, user="alice", echo=False, best_of=1)
    if stream:
        assert [c.choices[0].finish_reason for c in chat if c.choices][-1] == "length"
        assert [c.choices[0].finish_reason for c in text][-1] == "length"
    else:
        assert chat.choices[0].finish_reason == "length"
        assert text.choices[0].finish_reason == "length"


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    for most, fewest in ((10, 5), (5, 10)):
        chat = create(client, "chat", max_tokens=most, max_completion_tokens=fewest, temperature=0)
        assert chat.usage.completion_tokens == fewest


def test_unknown_fields_are_ignored_and_named_in_the_log(client: openai.OpenAI, node: NodeProcess) -> None:
    chat = create(client, "chat", max_tokens=4, extra_body={"frobnicate_the_widget": {"a": 1}})
    assert chat.choices[0].finish_reason == "length"
    [line] = [line for line in node.log().splitlines() if "frobnicate_the_widget" in line]
    assert "request fields ignored" in line


def test_a_job_asking_for_functions_is_refused_at_submission(node: NodeProcess) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "functions": FUNCTIONS}
    order = {"method": "POST", "url": "/v1/chat/completions", "body": body}
    response = httpx.post(f"{node.url}/v1/jobs", json=order)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "body.functions"
    assert "does not support function calls" in error["message"]
