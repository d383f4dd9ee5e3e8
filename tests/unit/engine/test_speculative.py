"""Prompt-lookup drafts (`engine/lookup.py`) verified in the scheduler's steps (`engine/generation.py`).

The drafts must change nothing but the speed: with them on, every request gets the tokens, text, finish
reason, usage and scores it gets with them off, greedy or sampled with a seed, whatever else runs beside
it. `RepeatingLM` writes text that repeats itself, with a break every few tokens, so drafts are kept and
refused both; its decode takes time like a real model's (a fixed part plus a part per token), which the
scheduler's cost model learns and decides by.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from edgegen.engine.generation import Scheduler
from edgegen.engine.lookup import PromptLookup
from edgegen.engine.sampling import SamplingParams
from edgegen.executors.base import DecodeItem
from tests.unit.engine.test_generation import END, VOCAB, CountingLM

GREEDY = SamplingParams(temperature=0)


class RepeatingLM(CountingLM):
    """Its next token is a function of the last two, except at every 9th position: so its text runs in
    cycles that a lookup guesses, broken now and then where a guess fails. Each decode sleeps
    2 ms + 0.3 ms a token."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.forgotten: list[tuple[int, int]] = []

    def row(self, context: list[int]) -> np.ndarray:
        row = np.linspace(0.0, 1.0, VOCAB, dtype=np.float32)  # a soft tail for the sampled requests
        cycle = 1 + (3 * context[-1] + context[-2]) % 5
        peak = 1 + len(context) % 7 if len(context) % 9 == 0 else cycle
        row[peak] = 6.0
        row[END] = 10.0 if len(context) >= self.ends_after.get(tuple(context[:4]), 10**9) else -10.0
        return row

    def decode(self, items: Sequence[DecodeItem]) -> list[np.ndarray]:
        time.sleep(0.002 + 0.0003 * sum(len(i.tokens) for i in items))
        return super().decode(items)

    def forget(self, seq: int, start: int) -> None:
        self.forgotten.append((seq, start))
        super().forget(seq, start)


async def _answers(
    lm: CountingLM, drafts: int, requests: list[dict[str, Any]]
) -> tuple[list[tuple[Any, ...]], Scheduler]:
    scheduler = Scheduler("toy", lm, max_num_seqs=4, n_batch=64, speculative_tokens=drafts)
    scheduler.start()

    async def one(request: dict[str, Any]) -> tuple[Any, ...]:
        generation = scheduler.submit(
            request["prompt"],
            request.get("params", GREEDY),
            max_tokens=request["max_tokens"],
            stop=request.get("stop", []),
            timeout_s=30,
            logprobs=request.get("logprobs"),
        )
        events = [event async for event in generation.events()]
        scores = [(s.token, s.logprob, s.top) for e in events for s in e.logprobs]
        text = "".join(e.text for e in events)
        usage = (generation.usage.prompt_tokens, generation.usage.completion_tokens)
        return text, events[-1].finish_reason, usage, scores

    try:
        return list(await asyncio.gather(*(one(r) for r in requests))), scheduler
    finally:
        await scheduler.close()


def _requests(params: SamplingParams, logprobs: int | None) -> list[dict[str, Any]]:
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 1, 2, 3, 5, 8, 13], [9, 9, 9]]
    requests = [
        {"prompt": p, "max_tokens": 40 + 7 * i, "params": params, "logprobs": logprobs}
        for i, p in enumerate(prompts)
    ]
    requests[1]["stop"] = ["dc"]  # a stop string that may come up in the middle of a step's drafts
    return requests


@pytest.mark.parametrize(
    ("params", "logprobs"),
    [
        (GREEDY, None),
        (GREEDY, 2),
        (SamplingParams(temperature=1.0, seed=11), None),
        (SamplingParams(temperature=0.7, top_p=0.9, seed=5, presence_penalty=1.5, frequency_penalty=0.3), 1),
    ],
)
async def test_drafts_change_no_answer(params: SamplingParams, logprobs: int | None) -> None:
    requests = _requests(params, logprobs)
    without, _ = await _answers(RepeatingLM(), 0, requests)
    lm = RepeatingLM()
    drafted, _ = await _answers(lm, 4, requests)
    assert drafted == without
    decode_items = [n for step in lm.steps for _, n in step if 1 < n <= 5]
    assert decode_items, "no step carried drafts"
    assert lm.forgotten, "no draft was ever refused"


async def test_a_request_that_ends_inside_its_drafts_keeps_only_its_own_cells() -> None:
    lm = RepeatingLM()
    lm.ends_after[(3, 1, 4, 1)] = 30  # the end token comes at position 30, in the middle of a cycle
    requests = [{"prompt": [3, 1, 4, 1, 5], "max_tokens": 100}, {"prompt": [2, 7, 1, 8], "max_tokens": 23}]
    answers, _ = await _answers(lm, 4, requests)
    assert answers[0][1:3] == ("stop", (5, 25))
    assert answers[1][1:3] == ("length", (4, 23))
    # What the cache holds is exactly what each slot says it holds: the next prompt continues it.
    assert len(lm.kv[0]) + len(lm.kv[1]) == 5 + 25 + 4 + 22


async def test_drafts_stop_where_the_context_ends() -> None:
    lm = RepeatingLM(n_ctx_seq=40)
    requests = [{"prompt": [3, 1, 4, 1, 5], "max_tokens": 34}]
    without, _ = await _answers(RepeatingLM(n_ctx_seq=40), 0, requests)
    drafted, _ = await _answers(lm, 8, requests)
    assert drafted == without
    assert max(len(cache) for cache in lm.kv.values()) <= 40


async def test_drafts_are_sent_only_where_they_are_kept() -> None:
    """A text the lookup cannot guess (`CountingLM` hashes its whole context) soon gets no drafts; one
    that repeats itself gets several tokens a step."""

    def drafted_share(lm: CountingLM) -> float:
        decoding = [n for step in lm.steps for _, n in step if n <= 5]
        return sum(n - 1 for n in decoding) / len(decoding)

    guessable = RepeatingLM()
    await _answers(guessable, 4, [{"prompt": [3, 1, 4, 1, 5, 9], "max_tokens": 120}])

    class Unguessable(RepeatingLM):
        def row(self, context: list[int]) -> np.ndarray:
            return CountingLM.row(self, context)

    unguessable = Unguessable()
    await _answers(unguessable, 4, [{"prompt": [3, 1, 4, 1, 5, 9], "max_tokens": 120}])
    assert drafted_share(guessable) > 0.8  # tokens drafted per step
    assert drafted_share(unguessable) < 0.2


def test_the_lookup_finds_the_longest_earlier_match_and_only_earlier_ones() -> None:
    lookup = PromptLookup([1, 2, 3, 4])
    assert lookup.draft(3) == []  # the text's own end is no match
    lookup.extend([9, 2, 3])
    assert lookup.draft(3) == [4, 9, 2]
    lookup.extend([4, 9, 2, 3, 7])
    assert lookup.draft(5) == []  # 2, 3, 7 and 3, 7 never came before
    lookup.extend([1, 2, 3])
    assert lookup.draft(2) == [4, 9]  # 1, 2, 3 began the text: the longer match wins over 2, 3 before 7
