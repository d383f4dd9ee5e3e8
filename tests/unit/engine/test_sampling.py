from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgegen.engine.sampling import SamplingParams, _nucleus, apply_penalties, sample

VOCAB = 49_152  # SmolLM2's

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
    # Every token with more mass than the picked one was kept, so the mass above it is below top_p
    # (weights are float32: logits closer than its resolution count as a tie).
    assert probs[probs > probs[token] * (1 + 1e-6)].sum() < top_p + 1e-6


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


def reference_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The textbook definition in float64 with full sorts: top-k, temperature, softmax, top-p."""
    scores = logits.astype(np.float64)
    keep = np.ones(len(scores), bool)
    if 0 < params.top_k < len(scores):
        keep[np.argsort(-scores, kind="stable")[params.top_k :]] = False
    probs = np.where(keep, np.exp((scores - scores[keep].max()) / params.temperature), 0.0)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        cut = int(np.searchsorted(cumulative, params.top_p)) + 1
        probs[order[cut:]] = 0.0
        probs /= probs.sum()
    return probs


def language_model_row(seed: int) -> np.ndarray:
    """Logits shaped like a language model's: a few strong candidates over a long, low tail."""
    rng = np.random.default_rng(seed)
    row = rng.standard_normal(VOCAB).astype(np.float32) * 2.0
    row[rng.choice(VOCAB, 40, replace=False)] += rng.uniform(6, 12, 40).astype(np.float32)
    return row


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.8, top_p=0.95),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.3, top_k=40),
        SamplingParams(temperature=0.7, top_k=100, top_p=0.9),
        SamplingParams(temperature=2.0),
    ],
    ids=lambda p: f"t{p.temperature}-p{p.top_p}-k{p.top_k}",
)
def test_draws_follow_the_reference_distribution(params: SamplingParams) -> None:
    """Chi-square of 6,000 draws against the float64 full-sort definition: the fast paths (float32
    weights, floors before the nucleus sort, block-wise draw) change no distribution."""
    draws = 6_000
    rng = np.random.default_rng(7)
    logits = language_model_row(0)
    expected = reference_distribution(logits, params) * draws
    counts = np.bincount([sample(logits, params, rng, []) for _ in range(draws)], minlength=VOCAB)
    assert counts[expected == 0].sum() == 0, "drew a token outside the reference's support"
    big = expected >= 5  # the usual chi-square rule; the rest is pooled in one bin
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    df = len(wanted) - 1
    # Far beyond the 1e-6 tail of chi-square(df) (Wilson-Hilferty: ~df + 7 sqrt(2 df) for these df).
    assert chi2 < df + 7 * np.sqrt(2 * df) + 10, (chi2, df)


@pytest.mark.parametrize("top_p", [0.5, 0.99999, 1.0 - 1e-12])
def test_the_nucleus_reaches_below_the_first_floors_when_it_must(top_p: float) -> None:
    """Half the tokens weigh 1e-4 of the others, a few 1e-9: a wide top_p needs them, so the floors step
    down, and the nucleus is still exactly the reference's."""
    weights = np.ones(5000, np.float32)
    weights[2500:] = 1e-4
    weights[4990:] = 1e-9
    logits = np.log(weights)
    kept = np.sort(_nucleus(weights, top_p))
    reference = np.flatnonzero(reference_distribution(logits, SamplingParams(temperature=1.0, top_p=top_p)))
    np.testing.assert_array_equal(kept, reference)


@settings(max_examples=200)
@given(
    finite_logits,
    st.floats(5e-324, 2.0),
    st.floats(5e-324, 1.0),
    st.integers(0, 8),
    st.integers(0, 2**32 - 1),
)
# A temperature whose scale fits float32 while a light token's scaled logit does not (it overflowed, with
# numpy's warning, before the overflow was declared harmless).
@example(np.array([0.0, 5.0, -3e4], np.float32), 1.175494351e-38, 1.0, 0, 0)
def test_any_valid_parameters_draw_a_token_that_can_be_drawn(
    logits: np.ndarray, temperature: float, top_p: float, top_k: int, seed: int
) -> None:
    """Extreme values a client may send (a denormal temperature or top_p) draw a token, never fail: the
    fuzzing of the OpenAI routes found a temperature of 5e-324 turning every weight into NaN."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    token = sample(logits, params, np.random.default_rng(seed), [])
    assert 0 <= token < len(logits)
    if top_k:
        assert logits[token] >= np.sort(logits)[-min(top_k, len(logits))]
