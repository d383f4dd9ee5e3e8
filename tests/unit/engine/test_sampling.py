from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgegen.engine.sampling import SamplingParams, apply_penalties, sample

finite_logits = arrays(
    np.float32,
    st.integers(2, 64),
    elements=st.floats(-30, 30, width=32, allow_nan=False, allow_infinity=False),
)


@given(finite_logits)
def test_greedy_is_argmax_and_uses_no_randomness(logits: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert sample(logits, SamplingParams(temperature=0), rng, []) == int(np.argmax(logits))
    assert rng.bit_generator.state == state


@given(finite_logits, st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_top_k_never_picks_outside_the_k_best(logits: np.ndarray, k: int, seed: int) -> None:
    token = sample(logits, SamplingParams(temperature=1.0, top_k=k), np.random.default_rng(seed), [])
    assert logits[token] >= np.sort(logits)[-min(k, len(logits))]


@given(finite_logits, st.floats(0.01, 1.0), st.integers(0, 2**32 - 1))
def test_top_p_keeps_the_most_likely_token_reachable_and_drops_the_tail(
    logits: np.ndarray, top_p: float, seed: int
) -> None:
    token = sample(logits, SamplingParams(temperature=1.0, top_p=top_p), np.random.default_rng(seed), [])
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    # Every token with more mass than the picked one was kept, so the mass above it is below top_p.
    assert probs[probs > probs[token]].sum() < top_p + 1e-9


@settings(max_examples=30)
@given(finite_logits, st.integers(0, 2**32 - 1))
def test_same_seed_same_token(logits: np.ndarray, seed: int) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=seed)
    first = sample(logits, params, np.random.default_rng(seed), [])
    assert all(sample(logits, params, np.random.default_rng(seed), []) == first for _ in range(3))


def test_penalties_lower_only_seen_tokens() -> None:
    logits = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, [0, 1, 1])
    np.testing.assert_allclose(out, [2.0 / 2 - 0.5 - 0.25, -2.0 * 2 - 0.5 - 0.5, 1.0, 0.5])
    assert apply_penalties(logits, SamplingParams(), [0, 1]) is logits


def test_low_temperature_concentrates_on_the_best_token() -> None:
    logits = np.array([1.0, 1.5, 0.0], np.float32)
    rng = np.random.default_rng(1)
    picks = [sample(logits, SamplingParams(temperature=0.05), rng, []) for _ in range(200)]
    assert picks.count(1) >= 199
