"""The executor contract: one loaded model version, one forward pass at a time.

An executor knows nothing of HTTP or queues. The engine calls `run` from a worker thread with a
batch already stacked along the first dimension, and owns any concurrency: `run` on one executor
instance is never entered twice at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgegen.store.manifest import TensorSpec


class Executor(Protocol):
    # Read-only to callers (properties here), so an executor may hold its specs in a plain list.
    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass: input name -> array (B, ...), returns output name -> array (B, ...)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DecodeItem:
    """One sequence's share of a decode step: `tokens` placed at positions pos, pos+1, …"""

    seq: int
    tokens: Sequence[int]
    pos: int
    logits: bool  # whether the step must return logits for the last of these tokens
    every: bool = False  # with `logits`: a row for each of these tokens (scoring a prompt), not the last only


# The bounds of a JSON schema a grammar is made from (`response_format`, a tool's parameters): its
# conversion and compilation take time and memory that grow with it.
MAX_SCHEMA_CHARS = 64 << 10
MAX_SCHEMA_DEPTH = 32


class Grammar(Protocol):
    """Which tokens may come next in a constrained answer (JSON of a schema), as it grows token by token.
    Used by the decode thread only."""

    def allows(self, token: int) -> bool: ...

    def constrain(self, row: np.ndarray) -> np.ndarray:
        """A copy of one row of logits with every token that may not come next at -inf."""
        ...

    def accept(self, token: int) -> None: ...


class LlmExecutor(Protocol):
    """A language model with a KV cache holding several sequences (slots 0 … n_seq-1).

    `decode` runs one batched forward pass over a mix of prompt chunks and single decode tokens and
    returns one row of logits (n_vocab,) per item that asked for them (one per token of an item with
    `every`), in item and token order. The rows are
    valid until the next call. The engine never calls two methods at once, except `tokenize` and
    `render_chat`, which read the vocabulary only and may run in other threads beside any call but `close`.
    """

    n_vocab: int
    n_seq: int
    n_ctx_seq: int  # KV positions available to one sequence
    n_cells: int  # KV positions all sequences share (n_ctx_seq <= n_cells <= n_seq * n_ctx_seq)
    # What one cached cell adds to each token decoded beside it (attention), as a share of the token's own
    # compute: the price of keeping an idle prefix, against computing it again
    cell_cost: float
    chat_takes_tools: bool  # the chat template writes `tools` itself; else engine/prompt.py describes them

    def tokenize(self, text: str, *, special: bool) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...

    def is_end(self, token: int) -> bool: ...

    def render_chat(
        self, messages: Sequence[Mapping[str, object]], tools: Sequence[Mapping[str, object]] | None = None
    ) -> str:
        """The chat in the model's template, the assistant's turn opened; `tools` only where
        `chat_takes_tools`."""
        ...

    def decode(self, items: Sequence[DecodeItem]) -> list[np.ndarray]: ...

    def json_grammar(self, schema: Mapping[str, Any] | None) -> Grammar:
        """A grammar for JSON that validates against `schema` (None: any JSON object). Raises
        InvalidInput for a schema it cannot express."""
        ...

    def forget(self, seq: int, start: int) -> None:
        """Drop KV positions >= start of sequence `seq` (start 0 empties it)."""
        ...

    def share(self, src: int, dst: int, length: int) -> None:
        """Make positions [0, length) of `src`'s cache part of `dst`'s too (no recompute)."""
        ...

    def close(self) -> None: ...
