"""The step budget against a known cost model: it learns the token count that meets the target."""

from __future__ import annotations

import pytest

from edgegen.engine.budget import MIN_PREFILL, StepBudget


def run_steps(budget: StepBudget, cost, decoding: int, steps: int, prompt_left: int = 10**6) -> list[int]:
    """Steps of `decoding` streams beside a long prompt; each step's seconds from `cost(tokens)`."""
    sizes = []
    for _ in range(steps):
        room = budget.room(decoding)
        chunk = min(room, prompt_left)
        prompt_left -= chunk
        tokens = decoding + chunk
        budget.observe(tokens, cost(tokens), filled=chunk == room and prompt_left > 0)
        sizes.append(tokens)
    return sizes


@pytest.mark.parametrize(("fixed_ms", "per_token_ms"), [(10.0, 3.0), (40.0, 0.5), (2.0, 6.0)])
def test_it_converges_on_the_target_from_either_side(fixed_ms: float, per_token_ms: float) -> None:
    target_ms = 75.0
    best = (target_ms - fixed_ms) / per_token_ms

    def cost(tokens: int) -> float:
        return (fixed_ms + per_token_ms * tokens) / 1000

    for first in (1, 500):  # a first step far below and far above the answer
        budget = StepBudget(target_ms / 1000, 512)
        budget.observe(first, cost(first), filled=True)
        sizes = run_steps(budget, cost, decoding=4, steps=40)
        assert abs(sizes[-1] - best) <= 2, (sizes, best)
        assert all(cost(n) <= 1.05 * target_ms / 1000 for n in sizes[3:])


def test_short_steps_that_left_room_raise_the_budget_but_never_lower_it() -> None:
    budget = StepBudget(0.1, 512)
    budget.observe(100, 0.1, filled=True)  # 100 tokens meet the target
    budget.observe(4, 0.01, filled=False)  # a short step says "at least 40": nothing new
    assert budget.room(4) == 96
    budget.observe(8, 0.004, filled=False)  # "at least 200": the budget moves up
    assert budget.room(4) > 96
    budget.observe(50, 0.2, filled=False)  # a step over the target lowers it, filled or not
    assert budget.room(4) < 96


def test_without_streams_or_target_a_step_takes_the_whole_batch() -> None:
    budget = StepBudget(0.05, 512)
    budget.observe(400, 2.0, filled=True)  # slow: 10 tokens meet the target
    assert budget.room(0) == 512  # nobody waits on a step with no running stream
    assert budget.room(8) == MIN_PREFILL  # the streams alone fill it: prompts still move on
    assert budget.room(510) == 2
    off = StepBudget(0.0, 512)
    off.observe(400, 2.0, filled=True)
    assert off.room(8) == 504


def test_drafts_may_only_use_what_the_target_leaves() -> None:
    budget = StepBudget(0.075, 512)
    assert budget.spare(8) == 504  # nothing learned yet: up to n_batch
    budget.observe(8, 0.075, filled=True)  # 8 tokens took the whole target
    assert budget.spare(8) == 0  # prompts still get MIN_PREFILL from `room`; drafts get nothing
    assert budget.room(8) > 0
    budget.observe(8, 0.025, filled=True)
    assert 0 < budget.spare(8) <= 16
    assert StepBudget(0, 512).spare(100) == 412  # no target: n_batch
