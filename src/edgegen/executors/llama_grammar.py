"""Constrained decoding with llama.cpp's grammar sampler: JSON that validates against a schema.

A JSON schema becomes a GBNF grammar through llama-cpp-python's converter (llama.cpp's own
json-schema-to-grammar, remote `$ref`s off), and the grammar a `llama_sampler` over the model's
vocabulary. The scheduler samples first and asks the grammar about the one token drawn; only when the
grammar refuses it is the whole row constrained and the draw repeated. Accepting a draw the grammar
allows and redrawing from the constrained row otherwise is the same as drawing from the constrained row
(the mass of the refused tokens is redistributed in proportion), and it spares the grammar a pass over
the 49k-token vocabulary at most steps, which costs milliseconds (llama.cpp's server does the same).

A schema is a client's input: its size, depth and repetition counts are bounded before it is converted
(`minItems: 1000000` would make the converter write a grammar of a million rules).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Mapping
from typing import Any

import llama_cpp as llama
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from edgegen.errors import InvalidInput
from edgegen.executors.base import MAX_SCHEMA_CHARS, MAX_SCHEMA_DEPTH

# llama_token_data: int32 id, float logit, float p (12 bytes, no padding)
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
MAX_REPEAT = 256  # the largest minItems / maxItems / minLength / maxLength / min-maxProperties accepted
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
ANY_OBJECT: dict[str, Any] = {
    "type": "object"
}  # json_object mode: spaces bounded, unlike a free JSON grammar


class LlamaGrammar:
    def __init__(self, vocab: llama.llama_vocab_p, n_vocab: int, gbnf: str) -> None:
        """Raises InvalidInput when llama.cpp cannot compile `gbnf`."""
        self._sampler = llama.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not self._sampler:
            raise InvalidInput("response_format: the schema gives a grammar llama.cpp cannot compile")
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._one = np.zeros(1, _TOKEN_DATA)

    def allows(self, token: int) -> bool:
        self._one["id"], self._one["logit"] = token, 0.0
        self._apply(self._one)
        return bool(np.isfinite(self._one["logit"][0]))

    def constrain(self, row: np.ndarray) -> np.ndarray:
        candidates = np.empty(len(row), _TOKEN_DATA)
        candidates["id"], candidates["logit"], candidates["p"] = self._ids, row, 0.0
        self._apply(candidates)
        return candidates["logit"].copy()

    def accept(self, token: int) -> None:
        llama.llama_sampler_accept(self._sampler, token)

    def _apply(self, candidates: np.ndarray) -> None:
        data = candidates.ctypes.data_as(llama.llama_token_data_p)
        array = llama.llama_token_data_array(data, len(candidates), -1, False)
        llama.llama_sampler_apply(self._sampler, ctypes.byref(array))

    def __del__(self) -> None:
        # The sampler is freed when its sequence is gone (the decode thread holds it while a step runs).
        if getattr(self, "_sampler", None):
            llama.llama_sampler_free(self._sampler)
            self._sampler = None


def schema_grammar(schema: Mapping[str, Any] | None) -> str:
    """The GBNF text for JSON valid under `schema` (None: any object). Raises InvalidInput."""
    schema = ANY_OBJECT if schema is None else schema
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidInput(
            f"response_format: the schema has {len(text)} characters; at most {MAX_SCHEMA_CHARS}"
        )
    _check_bounds(schema, 0)
    try:
        return str(json_schema_to_gbnf(text))
    except (RecursionError, MemoryError):
        raise InvalidInput("response_format: the schema is too deep") from None
    except Exception as exc:  # the converter asserts and raises on what it cannot express
        raise InvalidInput(f"response_format: invalid or unsupported JSON schema: {str(exc)[:200]}") from None


def _check_bounds(node: Any, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidInput(f"response_format: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, dict):
        for key in _COUNTS:
            value = node.get(key)
            if isinstance(value, int | float) and value > MAX_REPEAT:
                raise InvalidInput(f"response_format: {key} {value} is over {MAX_REPEAT}")
        for value in node.values():
            _check_bounds(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _check_bounds(value, depth + 1)
