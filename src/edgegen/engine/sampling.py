"""Per-request token sampling: pure functions of the logits, the request's parameters and its RNG.

The order follows llama.cpp's default chain: penalties on the raw logits, then top-k, then
temperature, then top-p (nucleus) over the softmax, then a draw. Temperature 0 is greedy (argmax,
ties to the lowest id), and draws nothing from the RNG, so a greedy request is deterministic whatever
else runs beside it; a sampled request with a seed gets its own `numpy.random.Generator`, so the same
seed gives the same text however requests are batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already seen (CTRL-style, as llama.cpp)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence
    seed: int | None = None
    min_tokens: int = 0  # end tokens are not sampled before this many tokens are generated
    ignore_eos: bool = False  # end tokens are never sampled: the answer runs to max_tokens or a stop

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_penalties(logits: np.ndarray, params: SamplingParams, history: Sequence[int]) -> np.ndarray:
    """Return penalized logits (a copy when any penalty applies). `history`: tokens generated so far."""
    if not history or (
        params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
    ):
        return logits
    ids, counts = np.unique(np.asarray(history, dtype=np.int64), return_counts=True)
    out = logits.astype(np.float32, copy=True)
    seen = out[ids]
    if params.repetition_penalty != 1.0:
        seen = np.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    seen = seen - params.presence_penalty - params.frequency_penalty * counts
    out[ids] = seen
    return out


def sample(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: Sequence[int]
) -> int:
    """Pick the next token id from one row of logits (n_vocab,).

    >>> greedy = SamplingParams(temperature=0)
    >>> sample(np.array([0.1, 3.0, 0.2], np.float32), greedy, np.random.default_rng(), [])
    1

    Sampling costs ~0.1 ms over a 49k vocabulary, not a full softmax's milliseconds: weights stay in
    float32 and unnormalized (their sum is taken once, in float64), the nucleus comes from a partial
    sort, and the draw walks blocks of the cumulative sum instead of building all of it.
    """
    scores = apply_penalties(logits, params, history)
    if params.greedy:
        return int(np.argmax(scores))
    candidates: np.ndarray | None = None
    if 0 < params.top_k < scores.shape[0]:
        candidates = np.argpartition(scores, -params.top_k)[-params.top_k :]
        scores = scores[candidates]
    scale = 1.0 / params.temperature
    if scale > _MAX_SCALE:  # so cold that every weight but the heaviest underflows: the limit is argmax
        best = int(np.argmax(scores))
        return best if candidates is None else int(candidates[best])
    # Shifted before it is scaled: the heaviest weighs exactly 1. At a temperature near float32's limit a
    # light token's scaled logit overflows to -inf: its weight is 0, which is what it is.
    with np.errstate(over="ignore"):
        weights = np.exp((scores.astype(np.float32, copy=False) - scores.max()) * np.float32(scale))
    if params.top_p < 1.0:
        nucleus = _nucleus(weights, params.top_p)
        candidates = nucleus if candidates is None else candidates[nucleus]
        weights = weights[nucleus]
    pick = _draw(weights, rng.random())
    return int(pick if candidates is None else candidates[pick])


def _nucleus(weights: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of heaviest weights whose share of the total reaches top_p (at least
    one), heaviest first.

    Only the weights above a floor are sorted, the floor lowered until they hold the mass needed: the
    nucleus lies among them (every heavier weight is in it before a lighter one). With a language model's
    logits the first floor (1e-3 of the heaviest) holds a few hundred tokens of 49k.
    """
    need = top_p * float(weights.sum(dtype=np.float64))
    for floor in _FLOORS:
        top = np.flatnonzero(weights >= floor)
        if float(weights[top].sum(dtype=np.float64)) >= need:
            break
    top = top[np.argsort(-weights[top], kind="stable")]
    cumulative = np.cumsum(weights[top], dtype=np.float64)
    return top[: min(int(np.searchsorted(cumulative, need)) + 1, len(top))]


# Weights are relative to the heaviest (1.0); the last floor takes every token.
_FLOORS = (1e-3, 1e-6, 1e-12, 0.0)
# The largest 1/temperature kept: past it float32 would overflow (a temperature under ~3e-39, which a
# client may send: OpenAI's bound is only > 0).
_MAX_SCALE = 1e38
_BLOCK = 1024


def _draw(weights: np.ndarray, u: float) -> int:
    """Inverse-CDF draw of an index with probability proportional to `weights`, `u` uniform in [0, 1).

    The cumulative sum is taken over blocks first, then inside the one block the draw falls in: two
    short cumulative sums instead of one over the whole vocabulary.
    """
    if len(weights) <= _BLOCK:
        cumulative = np.cumsum(weights, dtype=np.float64)
        return min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), len(weights) - 1)
    starts = np.arange(0, len(weights), _BLOCK)
    blocks = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    target = u * blocks[-1]
    b = min(int(np.searchsorted(blocks, target, side="right")), len(blocks) - 1)
    inner = np.cumsum(weights[starts[b] : starts[b] + _BLOCK], dtype=np.float64)
    inner += blocks[b - 1] if b else 0.0
    i = int(np.searchsorted(inner, target, side="right"))
    if i >= len(inner):  # rounding put the target past the block's end: its last token that can be drawn
        i = int(np.flatnonzero(weights[starts[b] : starts[b] + _BLOCK])[-1])
    return int(starts[b]) + i
