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
    """
    scores = apply_penalties(logits, params, history)
    if params.greedy:
        return int(np.argmax(scores))
    candidates = np.arange(scores.shape[0])
    if 0 < params.top_k < scores.shape[0]:
        keep = np.argpartition(scores, -params.top_k)[-params.top_k :]
        candidates, scores = keep, scores[keep]
    scaled = scores.astype(np.float64) / params.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        candidates, probs = _nucleus(candidates, probs, params.top_p)
    # Inverse-CDF draw: one uniform number per token, as cheap as it gets over a 49k vocabulary.
    cdf = np.cumsum(probs)
    pick = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
    return int(candidates[pick])


def _nucleus(candidates: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of most likely tokens whose mass reaches top_p (at least one), renormalized.

    Sorting a 49k vocabulary costs milliseconds per token; the nucleus is usually a few dozen tokens,
    so the k most likely are found with a partial sort, k doubling until their mass reaches top_p.
    """
    k = min(64, len(probs))
    while True:
        top = np.argpartition(probs, -k)[-k:] if k < len(probs) else np.arange(len(probs))
        top = top[np.argsort(-probs[top], kind="stable")]
        cumulative = np.cumsum(probs[top])
        if cumulative[-1] >= top_p or k == len(probs):
            break
        k = min(2 * k, len(probs))
    keep = top[: int(np.searchsorted(cumulative, top_p)) + 1]
    return candidates[keep], probs[keep] / probs[keep].sum()
