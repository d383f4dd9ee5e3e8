"""Which request fields the OpenAI routes take, refuse and ignore: the pure validation both the live
routes and the jobs API run (`validate_generation`), one field at a time."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from edgegen.config import LlmSettings
from edgegen.engine.sampling import SamplingParams
from edgegen.errors import InvalidInput
from edgegen.node.openai import (
    MAX_LOGGED_FIELDS,
    MAX_LOGGED_NAME,
    NOT_IMPLEMENTED,
    ChatRequest,
    CompletionRequest,
    text_request,
    validate_generation,
)

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "hi"}
ENDPOINTS = pytest.mark.parametrize(("url", "base"), [(CHAT_URL, CHAT), (COMPLETIONS_URL, COMPLETION)])


def check(url: str, body: dict[str, Any]) -> ChatRequest | CompletionRequest:
    return validate_generation(url, body, LlmSettings())


def refusal(url: str, body: dict[str, Any]) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        check(url, body)
    return caught.value


# What each field OpenAI defines and this node does not implement looks like when a client asks for it.
ASKING = [
    ("best_of", 3),
    ("suffix", "and then"),
    ("logit_bias", {"50256": -100}),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("function_call", {"name": "f"}),
    ("prediction", {"type": "content", "content": "x"}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("store", True),
]

# The values that ask for nothing, which clients send by default: they pass.
NEUTRAL = [
    ("best_of", None),
    ("best_of", 1),
    ("suffix", None),
    ("suffix", ""),
    ("logit_bias", None),
    ("logit_bias", {}),
    ("functions", None),
    ("functions", []),
    ("function_call", None),
    ("function_call", "none"),
    ("prediction", None),
    ("audio", None),
    ("modalities", None),
    ("modalities", ["text"]),
    ("store", None),
    ("store", False),
]


@ENDPOINTS
@pytest.mark.parametrize(("field", "value"), ASKING)
def test_a_field_the_node_does_not_implement_is_refused_by_name(
    url: str, base: dict[str, Any], field: str, value: object
) -> None:
    error = refusal(url, {**base, field: value})
    assert error.param == field
    assert error.message.startswith(f"{field}: ")
    assert "this server does not support" in error.message


@ENDPOINTS
@pytest.mark.parametrize(("field", "value"), NEUTRAL)
def test_the_value_that_asks_for_nothing_passes(
    url: str, base: dict[str, Any], field: str, value: object
) -> None:
    check(url, {**base, field: value})


def test_every_refused_field_is_tested() -> None:
    assert {field for field, _ in ASKING} == set(NOT_IMPLEMENTED)
    assert {field for field, _ in NEUTRAL} == set(NOT_IMPLEMENTED)


@pytest.mark.parametrize("value", [1, 0.0, "false", [], {}])
def test_a_neutral_value_of_another_type_asks_for_something(value: object) -> None:
    """`false` and `0` compare equal in Python; only the value itself passes, type and all."""
    assert refusal(COMPLETIONS_URL, {**COMPLETION, "store": value}).param == "store"


def test_a_job_body_names_the_field_under_body() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_generation(CHAT_URL, {**CHAT, "functions": [{"name": "f"}]}, LlmSettings(), at=("body",))
    assert caught.value.param == "body.functions"
    assert caught.value.message.startswith("body.functions: this server does not support function calls")


@ENDPOINTS
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", True),
        ("stream", "yes"),
        ("temperature", "0.5"),
        ("ignore_eos", 1),
        ("ignore_eos", "true"),
        ("ignore_eos", None),
        ("min_tokens", 1.5),
        ("min_tokens", -1),
        ("min_tokens", True),
        ("user", 5),
        ("user", "u" * 257),
        ("metadata", {"k": 5}),
        ("metadata", {f"k{i}": "v" for i in range(17)}),
        ("metadata", {"k" * 65: "v"}),
        ("metadata", "tag"),
        ("n", 0),
        ("n", 17),
        ("n", True),
        ("n", "2"),
    ],
)
def test_loose_types_and_out_of_range_values_are_refused_by_name(
    url: str, base: dict[str, Any], field: str, value: object
) -> None:
    error = refusal(url, {**base, field: value})
    assert error.param == field
    assert error.message.startswith(f"{field}")


def test_max_completion_tokens_is_refused_loose_too() -> None:
    assert refusal(CHAT_URL, {**CHAT, "max_completion_tokens": 1.0}).param == "max_completion_tokens"


@ENDPOINTS
def test_ignore_eos_and_min_tokens_reach_the_sampler(url: str, base: dict[str, Any]) -> None:
    body = check(url, {**base, "ignore_eos": True, "min_tokens": 5, "max_tokens": 8})
    assert text_request(body).params == SamplingParams(min_tokens=5, ignore_eos=True)


@ENDPOINTS
def test_by_default_end_tokens_end_the_answer(url: str, base: dict[str, Any]) -> None:
    assert text_request(check(url, base)).params == SamplingParams()


@ENDPOINTS
def test_min_tokens_over_the_maximum_names_both_numbers(url: str, base: dict[str, Any]) -> None:
    error = refusal(url, {**base, "min_tokens": 65, "max_tokens": 64})
    assert error.param == "min_tokens"
    assert "65" in error.message
    assert "64" in error.message


@ENDPOINTS
def test_min_tokens_up_to_the_maximum_or_without_one_passes(url: str, base: dict[str, Any]) -> None:
    check(url, {**base, "min_tokens": 64, "max_tokens": 64})
    check(url, {**base, "min_tokens": 4096})


@pytest.mark.parametrize(
    ("fields", "most"),
    [
        ({"max_tokens": 10}, 10),
        ({"max_completion_tokens": 7}, 7),
        ({"max_tokens": 10, "max_completion_tokens": 7}, 7),
        ({"max_tokens": 7, "max_completion_tokens": 10}, 10),
        ({}, None),
    ],
)
def test_max_completion_tokens_wins_over_max_tokens(fields: dict[str, int], most: int | None) -> None:
    assert text_request(check(CHAT_URL, {**CHAT, **fields})).max_tokens == most


def test_min_tokens_is_held_against_the_winning_maximum() -> None:
    body = {**CHAT, "max_tokens": 100, "max_completion_tokens": 10, "min_tokens": 20}
    assert "10 tokens" in refusal(CHAT_URL, body).message


@ENDPOINTS
def test_user_and_metadata_are_taken_and_change_nothing(url: str, base: dict[str, Any]) -> None:
    labelled = {**base, "user": "u" * 256, "metadata": {"team": "search", "k" * 64: "v" * 512}}
    assert text_request(check(url, labelled)) == text_request(check(url, base))
    check(url, {**base, "user": None, "metadata": None})


@ENDPOINTS
def test_unknown_fields_are_ignored_and_their_names_logged_once(
    url: str, base: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="edgegen.openai"):
        body = check(url, {**base, "frobnicate": 1, "x_trace": {"deep": [1, 2]}, "user": "me"})
    assert body.model == "m"
    [record] = caplog.records
    assert record.fields == ["frobnicate", "x_trace"]  # type: ignore[attr-defined]
    assert record.count == 2  # type: ignore[attr-defined]


def test_a_body_full_of_unknown_fields_logs_a_bounded_line(caplog: pytest.LogCaptureFixture) -> None:
    hostile = {f"{'f' * 1000}{i}\n": i for i in range(5000)}
    with caplog.at_level(logging.INFO, logger="edgegen.openai"):
        check(COMPLETIONS_URL, {**COMPLETION, **hostile})
    [record] = caplog.records
    assert len(record.fields) == MAX_LOGGED_FIELDS  # type: ignore[attr-defined]
    assert all(len(name) == MAX_LOGGED_NAME for name in record.fields)  # type: ignore[attr-defined]
    assert record.count == 5000  # type: ignore[attr-defined]


def test_known_fields_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="edgegen.openai"):
        check(CHAT_URL, {**CHAT, "max_completion_tokens": 3, "tools": None, "stream_options": None})
    assert caplog.records == []
