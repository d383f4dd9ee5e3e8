"""Token buckets: never more than burst + rate·T in any window; a refusal says truly how long to wait."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgegen.security.ratelimit import RateLimiter

gaps = st.lists(st.floats(0, 2.0, allow_nan=False), min_size=1, max_size=200)


@given(gaps, st.floats(0.5, 50), st.integers(1, 20))
def test_no_window_gets_more_than_burst_plus_rate_times_its_length(
    steps: list[float], rate: float, burst: int
) -> None:
    limiter = RateLimiter(rate, burst)
    times = list(itertools.accumulate(steps))
    allowed = [t for t in times if limiter.take("k", t) == 0.0]
    for i, start in enumerate(allowed):
        for end in allowed[i:]:
            count = sum(1 for t in allowed if start <= t <= end)
            assert count <= burst + rate * (end - start) + 1e-6


@given(gaps, st.floats(0.5, 50), st.integers(1, 20))
def test_waiting_what_a_refusal_says_is_enough(steps: list[float], rate: float, burst: int) -> None:
    limiter = RateLimiter(rate, burst)
    now = 0.0
    for step in steps:
        now += step
        wait = limiter.take("k", now)
        if wait:
            assert limiter.take("k", now + wait + 1e-9) == 0.0
            now += wait + 1e-9


def test_a_burst_then_the_sustained_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.take("a", 0.0) for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]
    assert limiter.take("b", 0.0) == 0.0  # keys do not share a bucket
    assert limiter.take("a", 0.5) == 0.0


def test_memory_is_bounded_oldest_first() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=3)
    for key in "abcd":
        limiter.take(key, 0.0)
    assert len(limiter) == 3
    assert limiter.take("a", 0.0) == 0.0  # "a" was dropped: it comes back with a full bucket
    assert limiter.take("d", 0.0) > 0  # "d" is still there, and empty


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0.5)])
def test_bad_limits(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        RateLimiter(rate, burst)
