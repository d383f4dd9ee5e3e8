"""The continuous-batching scheduler over a small deterministic language model.

`CountingLM` is a real `LlmExecutor`: its next-token distribution is a function of the whole sequence
in its KV cache, and it checks that every decode step places tokens exactly where that sequence's
cache ends — so a scheduler that mixes up positions, slots or cached prefixes gets wrong text, or an
assertion, here. The llama.cpp executor runs under the same scheduler in the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from edgegen.config import Settings
from edgegen.engine.generation import ECHO_CHUNK, Generation, Scheduler
from edgegen.engine.logprobs import score
from edgegen.engine.registry import ModelRegistry, ServedModel
from edgegen.engine.sampling import SamplingParams
from edgegen.engine.service import Caller, InferenceService, TextRequest
from edgegen.errors import DeadlineExceeded, InvalidInput, Overloaded
from edgegen.executors.base import DecodeItem
from edgegen.security.auth import Principal
from edgegen.store import Manifest, ModelStore
from tests.threaded import turns_while_held

VOCAB = 40
END = 0  # token 0 ends a generation


def next_token(sequence: Sequence[int]) -> int:
    """The toy model's greedy choice: a hash of the whole context, never END unless told."""
    h = 7
    for t in sequence:
        h = (h * 31 + t) % 1_000_003
    return 1 + h % (VOCAB - 2)


class CountingLM:
    n_vocab = VOCAB
    cell_cost = 0.0  # idle caches cost nothing here: they are kept until their cells are needed

    def __init__(self, n_seq: int = 4, n_ctx_seq: int = 256, n_cells: int | None = None) -> None:
        self.n_seq = n_seq
        self.n_ctx_seq = n_ctx_seq
        self.n_cells = n_cells or n_seq * n_ctx_seq
        self.kv: dict[int, list[int]] = {i: [] for i in range(n_seq)}
        self.steps: list[list[tuple[int, int]]] = []  # per step: (seq, n tokens)
        self.ends_after: dict[tuple[int, ...], int] = {}

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        return [1 + (ord(c) % (VOCAB - 2)) for c in text]

    def piece(self, token: int) -> bytes:
        return chr(ord("a") + token % 26).encode()

    def is_end(self, token: int) -> bool:
        return token == END

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return "".join(m["content"] for m in messages)

    def decode(self, items: Sequence[DecodeItem]) -> list[np.ndarray]:
        self.steps.append([(i.seq, len(i.tokens)) for i in items])
        assert len({i.seq for i in items}) == len(items), "a sequence twice in one step"
        rows = []
        for item in items:
            cache = self.kv[item.seq]
            assert item.pos == len(cache), f"seq {item.seq}: token at {item.pos}, cache ends at {len(cache)}"
            cache.extend(item.tokens)
            held = sum(len(c) for c in self.kv.values())  # llama.cpp's decode fails when its pool is full
            assert held <= self.n_cells, f"{held} cells in a pool of {self.n_cells}"
            if item.logits:
                first = len(cache) - len(item.tokens) + 1 if item.every else len(cache)
                rows += [self.row(cache[:end]) for end in range(first, len(cache) + 1)]
        return rows

    def row(self, context: list[int]) -> np.ndarray:
        """The logits after `context`: its next token far ahead, the end token when its time has come."""
        row = np.zeros(VOCAB, np.float32)
        row[next_token(context)] = 5.0
        row[END] = 10.0 if len(context) >= self.ends_after.get(tuple(context[:4]), 10**9) else -10.0
        return row

    def forget(self, seq: int, start: int) -> None:
        del self.kv[seq][start:]

    def share(self, src: int, dst: int, length: int) -> None:
        assert not self.kv[dst], "sharing into a slot that still holds tokens"
        self.kv[dst] = self.kv[src][:length]

    def close(self) -> None:
        pass


def reference(prompt: list[int], n: int) -> list[int]:
    out, context = [], list(prompt)
    for _ in range(n):
        token = next_token(context)
        out.append(token)
        context.append(token)
    return out


GREEDY = SamplingParams(temperature=0)


async def run(
    scheduler: Scheduler, prompt: list[int], n: int, **kw: object
) -> tuple[str, str | None, Generation]:
    generation = scheduler.submit(
        prompt,
        kw.pop("params", GREEDY),
        max_tokens=n,
        stop=kw.pop("stop", []),
        timeout_s=kw.pop("timeout_s", 10),
    )  # type: ignore[arg-type]
    text, reason = "", None
    async for event in generation.events():
        text += event.text
        reason = event.finish_reason
    return text, reason, generation


def as_text(lm: CountingLM, tokens: list[int]) -> str:
    return b"".join(lm.piece(t) for t in tokens).decode()


@pytest.fixture
async def lm_scheduler():
    lm = CountingLM()
    scheduler = Scheduler("toy", lm, max_num_seqs=4, n_batch=64)
    scheduler.start()
    yield lm, scheduler
    await scheduler.close()


async def test_greedy_generation_matches_the_model_run_alone(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    prompt = [5, 6, 7, 8, 9]
    text, reason, generation = await run(scheduler, prompt, 20)
    assert text == as_text(lm, reference(prompt, 20))
    assert reason == "length"
    assert (generation.usage.prompt_tokens, generation.usage.completion_tokens) == (5, 20)


async def test_parallel_sequences_each_get_their_own_tokens(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    prompts = [[i + 1, i + 2, i + 3] * (i + 1) for i in range(8)]  # 8 requests, 4 slots: some wait
    results = await asyncio.gather(*(run(scheduler, p, 15 + i) for i, p in enumerate(prompts)))
    for i, (prompt, (text, _, _)) in enumerate(zip(prompts, results, strict=True)):
        assert text == as_text(lm, reference(prompt, 15 + i))
    assert max(len(step) for step in lm.steps) > 1  # they really shared decode steps


async def test_a_long_prompt_is_prefilled_in_chunks_while_a_stream_keeps_decoding() -> None:
    lm = CountingLM()
    scheduler = Scheduler("toy", lm, max_num_seqs=4, n_batch=16)
    scheduler.start()
    try:
        running = scheduler.submit([1, 2, 3], GREEDY, max_tokens=250, stop=[], timeout_s=10)
        await running.events().__anext__()  # it is decoding now
        start = len(lm.steps)
        long_prompt = list(range(1, 38)) * 3  # 111 tokens: at least 8 steps of at most 15 prompt tokens
        text, _, _ = await run(scheduler, long_prompt, 5)
        running.cancel()
        assert text == as_text(lm, reference(long_prompt, 5))
        prefill_steps = [step for step in lm.steps[start:] if any(n > 1 for _, n in step)]
        assert len(prefill_steps) >= 7
        assert all(sum(n for _, n in step) <= 16 for step in lm.steps)
        # While the long prompt was prefilled, the running stream got its token in every step.
        assert all(any(n == 1 for _, n in step) for step in prefill_steps)
    finally:
        await scheduler.close()


async def test_shared_prefix_reuses_the_cache_and_gives_the_same_text(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    system = list(range(2, 30))
    first, _, cold = await run(scheduler, [*system, 31, 32], 10)
    second, _, warm = await run(scheduler, [*system, 33, 34, 35], 10)
    assert cold.usage.cached_tokens == 0
    assert warm.usage.cached_tokens == len(system)
    assert second == as_text(lm, reference([*system, 33, 34, 35], 10))
    again, _, same = await run(scheduler, [*system, 31, 32], 10)  # the first slot kept its cache
    assert again == first
    assert same.usage.cached_tokens == len(system) + 1  # all but the last prompt token


async def test_a_cached_prefix_serves_concurrent_requests_at_once(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    system = list(range(3, 33))
    await run(scheduler, [*system, 1], 2)
    prompts = [[*system, 2, i] for i in range(4)]
    results = await asyncio.gather(*(run(scheduler, p, 6) for p in prompts))
    for prompt, (text, _, generation) in zip(prompts, results, strict=True):
        assert generation.usage.cached_tokens == len(system)
        assert text == as_text(lm, reference(prompt, 6))


async def test_cancel_frees_the_slot(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    generation = scheduler.submit([1, 2, 3], GREEDY, max_tokens=200, stop=[], timeout_s=10)
    events = generation.events()
    await events.__anext__()
    assert scheduler.running == 1
    generation.cancel()
    for _ in range(100):
        if scheduler.running == 0:
            break
        await asyncio.sleep(0.001)
    assert scheduler.running == 0
    text, _, _ = await run(scheduler, [4, 5], 3)  # the freed slot serves the next request
    assert text == as_text(lm, reference([4, 5], 3))


async def test_end_token_and_stop_strings_finish_with_stop(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    prompt = [9, 9, 9, 9, 1]
    lm.ends_after[tuple(prompt[:4])] = len(prompt) + 3
    text, reason, generation = await run(scheduler, prompt, 50)
    assert (reason, generation.usage.completion_tokens) == ("stop", 3)
    assert text == as_text(lm, reference(prompt, 3))
    full = as_text(lm, reference([2, 4, 6], 30))
    stop = full[10:12]
    text, reason, _ = await run(scheduler, [2, 4, 6], 30, stop=[stop])
    assert reason == "stop"
    assert text == full[: full.find(stop)]


async def test_same_seed_same_text_and_sampling_varies_with_the_seed(lm_scheduler) -> None:
    _, scheduler = lm_scheduler
    params = [SamplingParams(temperature=5.0, seed=s) for s in (1, 1, 2)]
    a, b, c = [(await run(scheduler, [3, 1, 4], 30, params=p))[0] for p in params]
    assert a == b
    assert a != c


async def test_refusals_before_any_work(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    with pytest.raises(InvalidInput, match="context"):
        scheduler.submit([1] * 256, GREEDY, max_tokens=1, stop=[], timeout_s=1)
    with pytest.raises(InvalidInput, match="max_tokens"):
        scheduler.submit([1] * 200, GREEDY, max_tokens=100, stop=[], timeout_s=1)
    with pytest.raises(InvalidInput, match="empty"):
        scheduler.submit([], GREEDY, max_tokens=1, stop=[], timeout_s=1)
    assert lm.steps == []


async def test_full_waiting_queue_is_overloaded() -> None:
    scheduler = Scheduler("toy", CountingLM(n_seq=1), max_num_seqs=1, max_waiting=2)  # not started: all wait
    for _ in range(2):
        scheduler.submit([1], GREEDY, max_tokens=1, stop=[], timeout_s=1)
    with pytest.raises(Overloaded):
        scheduler.submit([1], GREEDY, max_tokens=1, stop=[], timeout_s=1)
    await scheduler.close()


async def test_deadline_ends_a_generation_with_an_error(lm_scheduler) -> None:
    _, scheduler = lm_scheduler
    with pytest.raises(DeadlineExceeded):
        await run(scheduler, [1, 2], 200, timeout_s=0.0)


async def test_the_node_metrics_observe_a_generation(caplog: pytest.LogCaptureFixture) -> None:
    from edgegen.observe.metrics import NodeMetrics

    metrics = NodeMetrics()
    scheduler = Scheduler("toy", CountingLM(), max_num_seqs=4, observer=metrics)
    scheduler.start()
    try:
        system = list(range(2, 12))
        await run(scheduler, [*system, 1], 5)
        await run(scheduler, [*system, 2], 5)
    finally:
        await scheduler.close()
    text = metrics.render().decode()
    assert 'edgegen_generated_tokens_total{model="toy"} 10.0' in text
    assert 'edgegen_prefix_cache_hit_tokens_total{model="toy"} 10.0' in text
    assert 'edgegen_time_to_first_token_seconds_count{model="toy"} 2.0' in text
    assert 'edgegen_sequences{model="toy",state="running"} 0.0' in text
    assert 'edgegen_decode_step_tokens_count{model="toy"}' in text
    assert "edgegen_kv_cache_usage_ratio" in text
    assert 'edgegen_kv_cache_wanted_ratio{model="toy"} 0.0' in text  # (nothing runs or waits)
    assert not [r for r in caplog.records if r.levelno >= 40]  # no observer failed


async def test_sequences_share_a_pool_of_cells_and_a_long_one_waits_its_turn() -> None:
    lm = CountingLM(n_seq=4, n_ctx_seq=128, n_cells=128)  # 4 slots, cells for one long or 3 short
    scheduler = Scheduler("toy", lm, max_num_seqs=4, n_batch=64)
    scheduler.start()
    try:
        shorts = [[i + 1, i + 2, i + 3, i + 4] for i in range(3)]  # 4 + 36 = 40 cells each
        long_prompt = list(range(100, 129))  # 29 + 90 = 119 cells: the pool, once the shorts are done
        later = [9, 8, 7, 6]
        first = [asyncio.create_task(run(scheduler, p, 36)) for p in shorts]
        await asyncio.sleep(0)
        long_one = asyncio.create_task(run(scheduler, long_prompt, 90))
        await asyncio.sleep(0)
        last = asyncio.create_task(run(scheduler, later, 36))  # fits beside the shorts, but comes after
        results = await asyncio.gather(*first, long_one, last)
        expected = zip([*shorts, long_prompt, later], [36, 36, 36, 90, 36], strict=True)
        for (prompt, n), (text, reason, _) in zip(expected, results, strict=True):
            assert text == as_text(lm, reference(prompt, n))  # every one finished, none failed
            assert reason == "length"
        concurrent = [len(step) for step in lm.steps]
        assert max(concurrent) == 3  # the shorts ran together; never the long one beside them
        long_steps = [i for i, step in enumerate(lm.steps) if any(n == 29 for _, n in step)]
        assert len(long_steps) == 1
        # First come, first served: the later short one did not pass the long one waiting for cells.
        assert all(len(step) == 1 for step in lm.steps[long_steps[0] : long_steps[0] + 90])
    finally:
        await scheduler.close()


class States:
    """What a scheduler tells of its state (a GenerationObserver): (waiting, kv_wanted / kv_total) each
    time."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_state(
        self, model: str, running: int, waiting: int, kv_used: int, kv_total: int, kv_wanted: int
    ) -> None:
        self.seen.append((waiting, kv_wanted / kv_total))

    def on_step(self, model: str, tokens: int) -> None:
        pass

    def on_first_token(self, model: str, seconds: float, prompt_tokens: int, cached_tokens: int) -> None:
        pass

    def on_token(self, model: str, seconds: float) -> None:
        pass


async def test_the_kv_cache_is_wanted_past_its_size_only_when_a_sequence_waits_for_cells() -> None:
    """The fleet's KV alert (deploy/prometheus/rules.yml) reads this: it read the tokens held, which a
    sequence waiting for cells reserved by others' max_tokens (not yet written) may never reach."""
    cells = States()
    lm = CountingLM(n_seq=4, n_ctx_seq=128, n_cells=128)
    scheduler = Scheduler("toy", lm, max_num_seqs=4, n_batch=64, observer=cells)
    scheduler.start()
    try:
        shorts = [asyncio.create_task(run(scheduler, [i + 1, i + 2, i + 3, i + 4], 36)) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.gather(*shorts, run(scheduler, list(range(100, 129)), 90))  # 119 cells: waits
    finally:
        await scheduler.close()
    assert max(ratio for waiting, ratio in cells.seen if waiting) == (3 * 40 + 119) / 128
    assert all(ratio <= 1 for waiting, ratio in cells.seen if not waiting)

    slot = States()
    scheduler = Scheduler("toy", CountingLM(n_seq=1, n_cells=128), max_num_seqs=1, observer=slot)
    scheduler.start()
    try:
        await asyncio.gather(*(run(scheduler, [i + 1, i + 2], 30) for i in range(3)))  # wait for the slot
    finally:
        await scheduler.close()
    assert any(waiting for waiting, _ in slot.seen)
    assert max(ratio for _, ratio in slot.seen) <= 1


async def test_idle_prefixes_are_given_up_for_a_sequence_that_needs_their_cells() -> None:
    lm = CountingLM(n_seq=4, n_ctx_seq=100, n_cells=100)
    scheduler = Scheduler("toy", lm, max_num_seqs=4, n_batch=64)
    scheduler.start()
    try:
        for start in (1, 11):  # two finished chats leave their caches in two slots (30 cells each)
            await run(scheduler, list(range(start, start + 10)), 20)
        assert sum(len(c) for c in lm.kv.values()) >= 58
        prompt = [30, 31, 32, 33]
        text, _, _ = await run(scheduler, prompt, 90)  # 94 cells: both caches must go
        assert text == as_text(lm, reference(prompt, 90))
        again, _, warm = await run(scheduler, list(range(1, 11)), 20)
        assert warm.usage.cached_tokens == 0  # its prefix was given up
        assert again == as_text(lm, reference(list(range(1, 11)), 20))
    finally:
        await scheduler.close()


async def test_a_cached_prefix_stays_while_the_pool_has_room(lm_scheduler) -> None:
    _, scheduler = lm_scheduler
    await run(scheduler, list(range(1, 11)), 20)
    await run(scheduler, [30, 31, 32, 33], 90)
    _, _, warm = await run(scheduler, list(range(1, 11)), 20)
    assert warm.usage.cached_tokens == 9  # all but the prompt's last token came from the cache


async def test_ignore_eos_and_min_tokens_hold_the_end_token_back(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    prompt = [8, 8, 8, 8, 2]
    lm.ends_after[tuple(prompt[:4])] = len(prompt) + 2  # the model wants to end after 2 tokens
    _, reason, plain = await run(scheduler, prompt, 40)
    assert (reason, plain.usage.completion_tokens) == ("stop", 2)
    held_back = SamplingParams(temperature=0, ignore_eos=True)
    text, reason, held = await run(scheduler, prompt, 40, params=held_back)
    assert (reason, held.usage.completion_tokens) == ("length", 40)
    assert text == as_text(lm, reference(prompt, 40))  # the best token that is not the end, every time
    _, reason, least = await run(scheduler, prompt, 40, params=SamplingParams(temperature=0, min_tokens=7))
    assert (reason, least.usage.completion_tokens) == ("stop", 7)
    sampled = SamplingParams(temperature=1.0, seed=3, ignore_eos=True)
    _, reason, drawn = await run(scheduler, prompt, 30, params=sampled)
    assert (reason, drawn.usage.completion_tokens) == ("length", 30)


async def test_prompts_that_fit_one_step_are_prefilled_together(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    prompts = [[i, i + 1, i + 2, i + 3, i + 4] for i in range(1, 4)]
    results = await asyncio.gather(*(run(scheduler, p, 4) for p in prompts))
    for prompt, (text, _, _) in zip(prompts, results, strict=True):
        assert text == as_text(lm, reference(prompt, 4))
    assert sorted(lm.steps[0]) == [(0, 5), (1, 5), (2, 5)]  # one step, three prompts (n_batch 64)


class SlowLM(CountingLM):
    """A step takes 2 ms plus 1 ms per token, as a compute-bound model's would (sleeping, so the
    scheduler's thread hand-off and the test machine's load add to it, as they would in a node)."""

    def decode(self, items: Sequence[DecodeItem]) -> list[np.ndarray]:
        time.sleep(0.002 + 0.001 * sum(len(i.tokens) for i in items))
        return super().decode(items)


async def test_a_prompt_beside_running_streams_is_chunked_to_the_latency_target() -> None:
    lm = SlowLM(n_ctx_seq=1024)
    # 30 ms target: ~28 tokens a step; a lone prompt still takes the whole n_batch.
    scheduler = Scheduler("toy", lm, max_num_seqs=4, n_batch=256, itl_target_ms=30)
    scheduler.start()
    try:
        lone = list(range(1, 39)) * 5  # 190 tokens, nothing running: one step
        await run(scheduler, lone, 1)
        assert lm.steps[0] == [(0, 190)]
        running = [scheduler.submit([k, 2, 3], GREEDY, max_tokens=600, stop=[], timeout_s=30) for k in (1, 2)]
        for generation in running:
            await generation.events().__anext__()
        start = len(lm.steps)
        long_prompt = list(range(2, 40)) * 5
        text, _, _ = await run(scheduler, long_prompt, 3)
        for generation in running:
            generation.cancel()
        assert text == as_text(lm, reference(long_prompt, 3))
        mixed = [step for step in lm.steps[start:] if any(n > 1 for _, n in step)]
        # ~190 prompt tokens at ≤ 28 a step, give or take what a loaded machine's sleeps teach the budget
        assert len(mixed) >= 4
        assert all(sum(n for _, n in step) <= 128 for step in mixed)
        assert all(sum(1 for _, n in step if n == 1) == 2 for step in mixed)  # both streams in every step
    finally:
        await scheduler.close()


async def test_logprobs_score_each_token_from_the_models_own_row(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    prompt = [1 + i % (VOCAB - 2) for i in range(77)]  # an echo prompt is scored in chunks of ECHO_CHUNK
    await run(scheduler, prompt[:40], 2)  # a cached prefix the echo request must not reuse
    start = len(lm.steps)
    generation = scheduler.submit(prompt, GREEDY, max_tokens=6, stop=[], timeout_s=10, logprobs=2, echo=True)
    scores = [s async for event in generation.events() for s in event.logprobs]
    answer = reference(prompt, 6)
    assert [s.token for s in scores] == answer
    context = list(prompt)
    for scored in scores:
        assert scored.logprob == pytest.approx(score(lm.row(context), scored.token, 2).logprob)
        assert scored.top[0][0] == next_token(context)
        assert len(scored.top) == 2
        context.append(scored.token)
    assert generation.usage.cached_tokens == 0
    assert [s.token for s in generation.prompt_logprobs] == prompt[1:]
    for i, scored in enumerate(generation.prompt_logprobs):
        assert scored.logprob == pytest.approx(score(lm.row(prompt[: i + 1]), prompt[i + 1], 2).logprob)
    assert max(n for step in lm.steps[start:] for _, n in step) <= ECHO_CHUNK


async def test_max_tokens_zero_only_scores_the_prompt(lm_scheduler) -> None:
    _lm, scheduler = lm_scheduler
    prompt = [4, 9, 2, 7]
    generation = scheduler.submit(prompt, GREEDY, max_tokens=0, stop=[], timeout_s=10, logprobs=0, echo=True)
    events = [event async for event in generation.events()]
    assert [(e.text, e.finish_reason) for e in events] == [("", "length")]
    assert generation.usage.completion_tokens == 0
    assert [s.token for s in generation.prompt_logprobs] == prompt[1:]
    assert all(s.top == () for s in generation.prompt_logprobs)


class OddTokens:
    """A grammar over the toy vocabulary: odd tokens only, and the end once 6 were taken."""

    def __init__(self) -> None:
        self.taken: list[int] = []

    def allows(self, token: int) -> bool:
        return token == END if len(self.taken) >= 6 else token % 2 == 1

    def constrain(self, row: np.ndarray) -> np.ndarray:
        return np.where([self.allows(t) for t in range(len(row))], row, -np.inf).astype(np.float32)

    def accept(self, token: int) -> None:
        self.taken.append(token)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.5, seed=4)])
async def test_a_grammar_decides_every_token_and_where_the_answer_ends(lm_scheduler, params) -> None:
    _, scheduler = lm_scheduler
    grammar = OddTokens()
    generation = scheduler.submit([2, 4, 6], params, max_tokens=40, stop=[], timeout_s=10, grammar=grammar)
    reason = [e.finish_reason async for e in generation.events()][-1]
    assert reason == "stop"
    assert generation.usage.completion_tokens == 6
    assert all(t % 2 == 1 for t in grammar.taken[:6])
    assert grammar.taken[6:] == [END]  # the grammar took the end token too


class AttendingLM(CountingLM):
    """A model whose idle cells cost each decoded token 1 % of a token: keeping a cache of n cells
    beside running streams costs as much as computing it again after 100 tokens decoded."""

    cell_cost = 0.01


async def test_an_idle_cache_is_trimmed_once_its_rent_exceeds_what_it_saves() -> None:
    lm = AttendingLM()
    scheduler = Scheduler("toy", lm, max_num_seqs=4, n_batch=64)
    scheduler.start()
    try:
        system = list(range(2, 22))
        idle_prompt = [*system, 30, 31]
        await run(scheduler, idle_prompt, 10)  # its slot keeps 31 cells
        idle = next(s for s, cache in lm.kv.items() if cache[: len(idle_prompt)] == idle_prompt)
        # A stream with the same system prompt shares those cells; 50 decoded tokens are not yet the
        # 100 that would pay for the rest.
        stream = scheduler.submit([*system, 33], GREEDY, max_tokens=200, stop=[], timeout_s=10)
        events = stream.events()
        for _ in range(50):
            await events.__anext__()
        assert len(lm.kv[idle]) == 31
        for _ in range(60):
            await events.__anext__()
        assert lm.kv[idle] == system  # past 100: trimmed to what the stream shares
        assert scheduler.reuse < 1.0  # an idle cache went unused: the next ones are kept less long
        stream.cancel()
        text, _, again = await run(scheduler, idle_prompt, 10)
        assert again.usage.cached_tokens == len(system)
        assert text == as_text(lm, reference(idle_prompt, 10))
    finally:
        await scheduler.close()


async def test_idle_caches_that_prompts_reuse_are_kept_longer() -> None:
    lm = AttendingLM()
    scheduler = Scheduler("toy", lm, max_num_seqs=4, n_batch=64)
    scheduler.start()
    try:
        for first in range(1, 30, 5):  # unrelated prompts: 4 slots, so idle caches are evicted unused
            await run(scheduler, [first, first + 1, first + 2], 4)
        unused = scheduler.reuse
        assert unused < 0.7
        chat = [5, 6, 7, 8, 9]
        for _ in range(4):  # a chat whose every turn continues the cache the last one left
            await run(scheduler, chat, 8)
            chat = [*chat, *reference(chat, 8), 3, 4]
        assert scheduler.reuse > unused  # its first turn evicted one more unused cache, the others reused
    finally:
        await scheduler.close()


async def test_the_choices_of_one_request_compute_its_prompt_once(lm_scheduler) -> None:
    lm, scheduler = lm_scheduler
    prompt = list(range(3, 40))
    choices: list[Generation] = []
    for i in range(3):
        params = SamplingParams(temperature=1.0, seed=100 + i)
        choices.append(
            scheduler.submit(
                prompt,
                params,
                max_tokens=12,
                stop=[],
                timeout_s=10,
                choice_of=choices[0] if choices else None,
            )
        )
    texts = ["".join([e.text async for e in c.events()]) for c in choices]
    prompt_tokens = sum(n for step in lm.steps for _, n in step if n > 1)
    assert prompt_tokens == len(prompt)  # the first choice's prefill; the others decoded its last token
    assert [c.usage.cached_tokens for c in choices] == [0, len(prompt) - 1, len(prompt) - 1]
    fresh = Scheduler("toy", CountingLM(), max_num_seqs=4, n_batch=64)
    fresh.start()
    try:
        for i, text in enumerate(texts):  # each choice is what its seed gives alone
            again, _, _ = await run(fresh, prompt, 12, params=SamplingParams(temperature=1.0, seed=100 + i))
            assert again == text
    finally:
        await fresh.close()
    assert len(set(texts)) == 3


def toy_manifest(version: str) -> Manifest:
    return Manifest(
        name="toy", version=version, format="gguf", task="generation", inputs=[], outputs=[], files={}
    )


class GatedLM(CountingLM):
    """Each step waits at `gate` (a long prompt's step on a real model takes seconds); the step count when
    the model was freed is noted."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.freed_after: int | None = None

    def decode(self, items: Sequence[DecodeItem]) -> list[np.ndarray]:
        self.gate.wait(10)
        return super().decode(items)

    def close(self) -> None:
        self.freed_after = len(self.steps)


async def test_a_model_replaced_mid_generation_finishes_what_runs_and_waits_then_is_freed() -> None:
    """A version swap drains the old version (registry `_drain`, `ServedModel.drain`): its generations end
    as they would have, the one running and one waiting for its only slot, each with its own tokens, and
    only then is the model freed. Before, the swap ended both at once with 503 "was unloaded"."""
    lm = SlowLM()
    scheduler = Scheduler("toy", lm, max_num_seqs=1, n_batch=64)
    scheduler.start()
    served = ServedModel(toy_manifest("1"), scheduler=scheduler)
    running = asyncio.create_task(run(scheduler, [1, 2, 3], 12))
    await asyncio.sleep(0.02)
    waiting = asyncio.create_task(run(scheduler, [4, 5, 6], 12))
    await asyncio.sleep(0)
    assert (scheduler.running, scheduler.waiting) == (1, 1)
    await served.drain()
    for task, prompt in ((running, [1, 2, 3]), (waiting, [4, 5, 6])):
        text, reason, _ = task.result()
        assert (text, reason) == (as_text(lm, reference(prompt, 12)), "length")
    with pytest.raises(Overloaded, match="unloaded"):
        scheduler.submit([7], GREEDY, max_tokens=1, stop=[], timeout_s=5)


async def test_closing_while_a_step_runs_waits_for_it_off_the_event_loop() -> None:
    """The node stopping while a step runs: the model is freed only after the step ends, and the event
    loop serves on meanwhile. Before, the step was waited for on the loop, which stopped the node."""
    lm = GatedLM()
    scheduler = Scheduler("toy", lm, max_num_seqs=4, n_batch=64)
    scheduler.start()
    lm.gate.clear()
    generation = asyncio.create_task(run(scheduler, [1, 2, 3], 4))
    await asyncio.sleep(0.05)  # its first step waits at the gate
    assert await turns_while_held(scheduler.close(), lm.gate) >= 10
    assert lm.freed_after == len(lm.steps) == 1
    with pytest.raises(Overloaded, match="unloaded"):
        await generation


class HeldTokenizer(CountingLM):
    """Its tokenizer waits at `gate` (a long prompt being tokenized)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        self.gate.wait(10)
        return super().tokenize(text, special=special)


async def test_a_prompt_tokenized_while_its_version_is_replaced_is_generated_by_the_new_one(
    tmp_path: Path,
) -> None:
    """A chat's prompt is being tokenized by the old version when the new one is installed: nothing of it
    is queued yet, so the old version closes once the tokenizer is done, and the request goes to the new
    version, which tokenizes it anew. Before, it ended in 503 "was unloaded"."""
    registry = ModelRegistry(ModelStore(tmp_path / "models"), Settings(home=tmp_path))
    registry.loaded = True
    old_lm, new_lm = HeldTokenizer(), HeldTokenizer()
    old = ServedModel(toy_manifest("1"), scheduler=Scheduler("toy", old_lm, max_num_seqs=2, n_batch=64))
    new = ServedModel(toy_manifest("2"), scheduler=Scheduler("toy", new_lm, max_num_seqs=2, n_batch=64))
    registry._install("toy", old, None)
    service = InferenceService(registry, None, request_timeout_s=5, generation_timeout_s=5)
    caller = Caller(Principal("key:t", "user"))
    old_lm.gate.clear()
    request = TextRequest(GREEDY, max_tokens=4, text="hello")
    asking = asyncio.create_task(service.generate(caller, service.generator(caller, "toy"), request))
    await asyncio.sleep(0.05)  # in the old version's tokenizer
    registry._install("toy", new, old)
    await asyncio.sleep(0.05)
    old_lm.gate.set()
    sources, _ = await asyncio.wait_for(asking, 5)
    text = "".join([event.text async for event in sources[0].events()])
    assert text == as_text(new_lm, reference(new_lm.tokenize("hello", special=False), 4))
    assert new_lm.steps
    assert not old_lm.steps
    await registry.close()
