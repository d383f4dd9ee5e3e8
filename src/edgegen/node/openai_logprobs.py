"""Log probabilities in OpenAI's two shapes: chat's `logprobs.content` and the legacy completions object.

Chat (`"logprobs": true`, `"top_logprobs": k`): one entry per generated token, with its text, its UTF-8
bytes (a token may hold part of a character) and the k most likely alternatives:

    {"content": [{"token": " Paris", "logprob": -0.01, "bytes": [32, 80, …], "top_logprobs": [{…}, …]}]}

Completions (`"logprobs": k`, and with `"echo": true` the prompt's tokens first; the prompt's first token
has no log probability, there being nothing before it to predict it from), as evaluation harnesses
(lm-evaluation-harness's `local-completions`) read it:

    {"tokens": ["The", " cat"], "token_logprobs": [null, -3.2], "top_logprobs": [null, {" cat": -3.2}],
     "text_offset": [0, 3]}

`text_offset` counts characters of the returned text; a token that holds part of a character shows as
U+FFFD in `tokens`, as it does in OpenAI's answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from edgegen.engine.logprobs import TokenLogprob


class LogprobWriter:
    def __init__(self, piece: Callable[[int], bytes]) -> None:
        """`piece`: a token's bytes (the model's vocabulary)."""
        self._piece = piece

    def text(self, token: int) -> str:
        return self._piece(token).decode(errors="replace")

    def chat(self, scores: Sequence[TokenLogprob]) -> dict[str, Any]:
        return {"content": [self._chat_entry(s) for s in scores]}

    def _chat_entry(self, scored: TokenLogprob) -> dict[str, Any]:
        entry = self._alternative(scored.token, scored.logprob)
        entry["top_logprobs"] = [self._alternative(token, logprob) for token, logprob in scored.top]
        return entry

    def _alternative(self, token: int, logprob: float) -> dict[str, Any]:
        data = self._piece(token)
        return {"token": data.decode(errors="replace"), "logprob": logprob, "bytes": list(data)}

    def completion(
        self, scores: Sequence[TokenLogprob], offset: int = 0, first: int | None = None
    ) -> dict[str, Any]:
        """The legacy object for `scores`, their text starting at character `offset` of the answer;
        `first`: a token before them that has no score (the prompt's first, with echo)."""
        tokens: list[str] = []
        logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        if first is not None:
            tokens.append(self.text(first))
            logprobs.append(None)
            tops.append(None)
        for scored in scores:
            tokens.append(self.text(scored.token))
            logprobs.append(scored.logprob)
            tops.append({self.text(token): logprob for token, logprob in scored.top})
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def merge_completion(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One legacy object from several (the prompt's and the answer's)."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [value for part in parts for value in part[key]] for key in keys}
