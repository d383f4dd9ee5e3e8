"""JSON grammars over the tiny model's vocabulary: what they allow, and what greedy decoding under them
writes (real llama.cpp grammar sampler, real model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgegen.config import LlmSettings
from edgegen.errors import InvalidInput
from edgegen.executors.base import MAX_SCHEMA_DEPTH, DecodeItem
from edgegen.executors.llama_grammar import MAX_REPEAT, schema_grammar
from edgegen.executors.llamacpp import LlamaExecutor
from tests.json_shapes import conforms
from tests.llm_models import write_tiny_llama

SCHEMAS = [
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"]},
    {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "minItems": 2, "maxItems": 3},
]


@pytest.fixture(scope="module")
def executor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaExecutor]:
    path = write_tiny_llama(tmp_path_factory.mktemp("grammar") / "tiny.gguf")
    executor = LlamaExecutor(path, LlmSettings(max_num_seqs=1, ctx_per_seq=256, threads=1))
    yield executor
    executor.close()


def constrained_greedy(executor: LlamaExecutor, schema: dict[str, object] | None, limit: int = 120) -> str:
    grammar = executor.json_grammar(schema)
    executor.forget(0, 0)
    prompt = executor.tokenize("hello there", special=False)
    row = executor.decode([DecodeItem(0, prompt, 0, True)])[0]
    out, pos = b"", len(prompt)
    for _ in range(limit):
        token = int(np.argmax(row))
        if not grammar.allows(token):
            constrained = grammar.constrain(row)
            assert not np.isfinite(constrained[token])
            token = int(np.argmax(constrained))
        if executor.is_end(token):
            return out.decode()
        grammar.accept(token)
        out += executor.piece(token)
        row = executor.decode([DecodeItem(0, [token], pos, True)])[0]
        pos += 1
    pytest.fail(f"no end within {limit} tokens: {out!r}")


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum", "array"])
def test_greedy_decoding_under_the_grammar_writes_valid_json(executor: LlamaExecutor, schema: dict) -> None:
    text = constrained_greedy(executor, schema)
    assert conforms(json.loads(text), schema), text


def test_json_object_mode_writes_an_object(executor: LlamaExecutor) -> None:
    assert isinstance(json.loads(constrained_greedy(executor, None)), dict)


def test_constrain_and_allows_agree(executor: LlamaExecutor) -> None:
    grammar = executor.json_grammar(SCHEMAS[0])
    row = np.zeros(executor.n_vocab, np.float32)
    allowed = np.isfinite(grammar.constrain(row))
    assert 0 < allowed.sum() < executor.n_vocab  # an object opens with "{" (and little else)
    sample = np.random.default_rng(0).choice(executor.n_vocab, 200, replace=False)
    assert [grammar.allows(int(t)) for t in sample] == list(allowed[sample])
    assert all(executor.piece(int(t)).lstrip().startswith(b"{") for t in np.flatnonzero(allowed))


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "wat"}, "unsupported"),
        ({"$ref": "https://example.com/schema.json"}, "unsupported"),
        ({"type": "string", "pattern": "("}, "unsupported"),
        ({"type": "array", "minItems": MAX_REPEAT + 1}, "minItems"),
        ({"type": "string", "maxLength": 10**9}, "maxLength"),
        ({"type": "object", "properties": {"x": {"type": "string", "minLength": 1e300}}}, "minLength"),
        ({"description": "x" * 70_000}, "characters"),
    ],
)
def test_a_schema_it_cannot_or_should_not_express_is_invalid_input(schema: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        schema_grammar(schema)


def test_a_deep_schema_is_refused_before_conversion() -> None:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidInput, match="deeper"):
        schema_grammar(schema)


def test_a_grammar_for_an_absent_path_is_not_fetched(executor: LlamaExecutor, tmp_path: Path) -> None:
    """A `$ref` to a file or URL is never read: the converter's fetching is off."""
    target = tmp_path / "s.json"
    target.write_text('{"type": "string"}')
    with pytest.raises(InvalidInput):
        executor.json_grammar({"$ref": target.as_uri()})
