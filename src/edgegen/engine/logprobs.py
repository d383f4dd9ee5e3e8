"""Log probabilities of tokens, as OpenAI's `logprobs` reports them and evaluation harnesses read them.

A token's log probability is taken from the model's own distribution: the log-softmax of its raw logits,
before penalties, temperature, top-k or top-p shape what is sampled (as OpenAI and vLLM report them), so
the same text scores the same whatever sampling parameters came with it. The sum runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens and theirs, most likely first


def score(row: np.ndarray, token: int, top: int) -> TokenLogprob:
    """`token`'s log probability in one row of logits, and the `top` most likely tokens'.

    >>> s = score(np.log(np.array([0.5, 0.25, 0.25], np.float32)), 1, 1)
    >>> round(s.logprob, 4), s.top[0][0], round(s.top[0][1], 4)
    (-1.3863, 0, -0.6931)
    """
    peak = float(row.max())
    total = peak + float(np.log(np.exp(row - peak, dtype=np.float64).sum()))
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, row.shape[0])
        ids = np.argpartition(row, -k)[-k:]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best = tuple((int(i), float(row[i]) - total) for i in ids)
    return TokenLogprob(token, float(row[token]) - total, best)
