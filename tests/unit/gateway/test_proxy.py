"""The proxy's pure parts: what it forwards, what a chat sticks to, how many retries it may spend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgegen.errors import ConfigError
from edgegen.gateway.proxy import Proxy, RetryBudget
from edgegen.gateway.settings import RetrySettings, load_gateway_settings
from edgegen.gateway.target import affinity_key, json_body, model_of


def test_forwarded_headers_are_the_gateways_not_the_clients() -> None:
    scope = {
        "headers": [
            (b"host", b"edge.example"),
            (b"content-type", b"application/json"),
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"forwarded", b"for=6.6.6.6"),
            (b"x-real-ip", b"6.6.6.6"),
            (b"x-edgegen-role", b"admin"),
            (b"connection", b"keep-alive, x-secret"),
            (b"transfer-encoding", b"chunked"),
            (b"x-request-id", b"client-chosen"),
            (b"x-session-id", b"chat-7"),
        ],
        "client": ("10.0.0.7", 5555),
        "scheme": "http",
    }
    forwarded, session = Proxy._forward_headers(scope, "rid-1")
    assert forwarded == [
        (b"content-type", b"application/json"),
        (b"x-session-id", b"chat-7"),
        (b"x-forwarded-for", b"10.0.0.7"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"edge.example"),
        (b"x-request-id", b"rid-1"),
    ]
    assert session == b"chat-7"


def key_of(path: str, headers: dict[bytes, bytes], body: bytes) -> bytes | None:
    """The key as the proxy computes it: from the session header and the body parsed once."""
    return affinity_key(headers.get(b"x-session-id"), json_body(path, body))


@pytest.mark.parametrize(
    ("path", "headers", "body", "key"),
    [
        ("/v1/completions", {}, b'{"prompt": "abc"}', b"abc"),
        ("/v1/chat/completions", {}, b'{"user": "u1", "messages": []}', b"user:u1"),
        ("/v1/chat/completions", {b"x-session-id": b"s9"}, b"{}", b"session:s9"),
        ("/v1/chat/completions", {}, b'{"messages": [{"role": "user", "content": "hi"}]}',
         b'[{"role":"user","content":"hi"}]'),
        ("/v1/chat/completions", {}, b"not json", None),
        ("/v1/chat/completions", {}, b"[1, 2]", None),
        ("/predict", {}, b'{"input_data": [1]}', None),
    ],
)  # fmt: skip
def test_affinity_keys(path: str, headers: dict[bytes, bytes], body: bytes, key: bytes | None) -> None:
    assert key_of(path, headers, body) == key


def test_a_chat_keeps_its_key_as_it_grows() -> None:
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    longer = [*turns, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]
    first = key_of("/v1/chat/completions", {}, json.dumps({"messages": turns}).encode())
    later = key_of("/v1/chat/completions", {}, json.dumps({"messages": longer}).encode())
    assert first == later
    other = key_of("/v1/chat/completions", {}, json.dumps({"messages": longer[1:]}).encode())
    assert other != first


@pytest.mark.parametrize(
    ("path", "body", "model"),
    [
        ("/models/digits/predict", b"", "digits"),
        ("/v2/models/digits/infer", b"", "digits"),
        ("/v1/chat/completions", b'{"model": "tiny"}', "tiny"),
        ("/v1/chat/completions", b"{", None),
        ("/v1/chat/completions", b'["model"]', None),
        ("/predict", b"{}", None),
    ],
)
def test_the_model_a_request_names(path: str, body: bytes, model: str | None) -> None:
    assert model_of(path, json_body(path, body)) == model


def test_the_retry_budget_refills_per_request_and_caps() -> None:
    budget = RetryBudget(RetrySettings(budget_ratio=0.5, budget_min=2))
    assert budget.withdraw()
    assert budget.withdraw()
    assert not budget.withdraw()  # spent
    budget.deposit()
    assert not budget.withdraw()  # half a retry
    budget.deposit()
    assert budget.withdraw()
    for _ in range(100):
        budget.deposit()
    assert budget.tokens == 2  # capped


def test_a_bad_gateway_config_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[[nodes]]\nurl = "http://127.0.0.1:1"\n[balancer]\ndefault = "random"\n')
    with pytest.raises(ConfigError, match=r"balancer\.default") as caught:
        load_gateway_settings(path)
    assert "\n" not in caught.value.message
    path.write_text("[[nodes]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_gateway_settings(path)
