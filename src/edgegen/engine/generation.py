"""Continuous batching for language models: our scheduler over an `LlmExecutor`.

Every step builds one batch for `executor.decode`: one token of each running sequence first, then
chunks of the prompts being prefilled, oldest first, up to the step's token budget. With no stream
running the budget is `n_batch`; while streams run it is what keeps a step near the inter-token latency
target (`itl_target_ms`, learned from the steps' own times: `engine/budget.py`), so a newcomer's long
prompt is prefilled over several steps and never stalls the streams already running (Sarathi-Serve's
chunked prefill). A sequence joins as soon as a slot is free and leaves the moment it finishes, is
cancelled or passes its deadline.

KV cells: the slots share one pool of `executor.n_cells` cells. A sequence joins only when the cells it
may come to hold (its prompt plus `max_tokens`) are free besides what every running sequence may come to
hold, so a running sequence never finds the pool full: a long request waits in line (first come, first
served), it never evicts or fails one that runs. Idle slots' cached prefixes are the first thing given
up for it, least recently used first. Cells are counted per slot, so a prefix shared by two slots counts
twice: the count can only overstate what llama.cpp holds.

Prefix caching: a finished sequence's slot keeps its KV cache and remembers the tokens in it. A new
prompt finds the slot (busy or free) whose cached tokens share the longest prefix with it and prefills
only the rest — a common system prompt or a chat's earlier turns are computed once. When that slot
is free the new sequence continues in it; otherwise it takes the least valuable free slot and the
prefix is shared into it (llama.cpp's seq_cp: the cells are tagged, not copied), so one system prompt
cached once serves every slot at the same time. A free slot whose cache goes on past the common prefix
(an earlier chat's answer) is kept as it is while another slot is free.

Prefixes are shared only within one tenant: reused tokens show in a reply's
`usage.prompt_tokens_details.cached_tokens` and in its time to first token, so a prefix reused across
tenants would let one tenant probe what another one's prompts begin with. A slot remembers whose tokens
it holds; another tenant's sequence may take the slot (its cache is then dropped) but never reuse it.

The decode call and the sampling run in one worker thread (llama.cpp releases the GIL), so the event
loop keeps serving HTTP meanwhile; all scheduler state is touched only on the event loop. Rendering a
chat and tokenizing a prompt run in two more threads (`render_chat`, `encode`: they read the vocabulary
only, so they may run beside a decode step); `close` waits for them before the model is freed.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from edgegen.engine.budget import StepBudget, StepCost
from edgegen.engine.logprobs import TokenLogprob, score
from edgegen.engine.lookup import PromptLookup
from edgegen.engine.prompt import Prompt, chat_prompt, encode
from edgegen.engine.sampling import SamplingParams, sample
from edgegen.engine.text import TextStream
from edgegen.errors import DeadlineExceeded, EdgegenError, ExecutorError, InvalidInput, Overloaded, Unloaded
from edgegen.executors.base import DecodeItem, Grammar, LlmExecutor
from edgegen.observe import tracing
from edgegen.observe.tracing import GenerationTrace

log = logging.getLogger(__name__)
# Prompt tokens an `echo` sequence prefills per step: llama.cpp keeps an output buffer of n_vocab floats
# for each row a step returns (SmolLM2: 6 MB for 32 rows), and never shrinks it.
ECHO_CHUNK = 32
# How fast a sequence's draft acceptance forgets: the weight of the newest guess checked.
_DRAFT_SMOOTHING = 0.3
_DRAFT_PRIOR = 0.5  # a new sequence's acceptance, before its first guess was checked
_REUSE_SMOOTHING = 0.2  # the weight of the newest idle cache's fate in the reuse estimate
# The least share of an idle cache assumed to be reused: a cache is kept beside running streams for at
# least this share of what computing it again costs.
_REUSE_FLOOR = 0.05
Arg = TypeVar("Arg")
Result = TypeVar("Result")


class GenerationObserver(Protocol):
    def on_state(
        self, model: str, running: int, waiting: int, kv_used: int, kv_total: int, kv_wanted: int
    ) -> None:
        """The scheduler now: sequences running and waiting; KV cells held (`kv_used`, idle caches
        included) of `kv_total`; and `kv_wanted`, the cells the running sequences may come to hold
        (prompt and `max_tokens`) plus those the first waiting one needs: past `kv_total`, it waits for
        cells, not for a slot."""

    def on_step(self, model: str, tokens: int) -> None: ...

    def on_first_token(self, model: str, seconds: float, prompt_tokens: int, cached_tokens: int) -> None: ...

    def on_token(self, model: str, seconds: float) -> None: ...


@dataclass
class Event:
    """A piece of a generation's output: new text, and at the end why it finished."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    error: EdgegenError | None = None
    # With `logprobs`: the tokens generated since the last event, scored (their text may be in this
    # event's or still held back, as for a stop string that might be starting)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    deadline: float
    text: TextStream
    tenant: str
    logprobs: int | None = None  # None: no scores; else how many alternatives each score lists
    echo: bool = False  # score the prompt's tokens too (its cache is then computed, not reused)
    grammar: Grammar | None = None  # what the answer must be (JSON of a schema); None: free text
    leader: _Sequence | None = None  # another choice of the same request, whose prompt cells it shares
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    rng: np.random.Generator = field(init=False)
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the KV cache
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled, not yet decoded into the cache
    scores: list[TokenLogprob] = field(default_factory=list)  # scored, not yet in an event
    prompt_scores: list[TokenLogprob] = field(default_factory=list)  # with echo: prompt tokens 1, 2, …
    usage: Usage = field(default_factory=Usage)
    lookup: PromptLookup | None = None  # its prompt and answer, indexed for drafts; None: no drafts yet
    guess: list[int] = field(default_factory=list)  # the lookup's draft for the next tokens, this step
    acceptance: float = _DRAFT_PRIOR  # how often a guessed token was the one sampled (smoothed)
    submitted: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0
    trace: GenerationTrace | None = None  # tracing on: its queue, prefill and decode, told as spans
    cancelled: bool = False
    done: bool = False

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)
        self.usage.prompt_tokens = len(self.prompt)


@dataclass
class _Outcome:
    """What one item of a decode step gave its sequence."""

    # Sampled where the prompt ended or the stream decoded in this step: one token, or with drafts the
    # drafts the samples agreed with and the sample after them
    tokens: list[int] = field(default_factory=list)
    scores: list[TokenLogprob] = field(default_factory=list)  # the sampled tokens', with `logprobs`
    prompt_scores: list[TokenLogprob] = field(default_factory=list)  # with `echo`


class Generation:
    """The handle a route holds: iterate its events; `cancel()` frees its slot at the next step."""

    def __init__(self, sequence: _Sequence, scheduler: Scheduler) -> None:
        self._sequence = sequence
        self._scheduler = scheduler

    @property
    def usage(self) -> Usage:
        return self._sequence.usage

    @property
    def prompt_tokens(self) -> list[int]:
        return self._sequence.prompt

    @property
    def prompt_logprobs(self) -> list[TokenLogprob]:
        """With `echo`: the log probability of each prompt token but the first, complete once the
        first event has come."""
        return self._sequence.prompt_scores

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._sequence.events.get()
            if event.error is not None:
                raise event.error
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        if not self._sequence.done:
            self._sequence.cancelled = True
            self._scheduler.wake()


@dataclass
class _Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # what its KV cache holds, position by position
    tenant: str = ""  # whose prompts `tokens` came from
    owner: _Sequence | None = None
    released_at: float = 0.0
    rent: float = 0.0  # while idle: tokens decoded beside its cache since it was last trimmed


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _json_grammar(executor: LlmExecutor, schema: Mapping[str, Any] | None) -> Grammar:
    return executor.json_grammar(schema)


class Scheduler:
    def __init__(
        self,
        model: str,
        executor: LlmExecutor,
        *,
        max_num_seqs: int,
        n_batch: int = 512,
        itl_target_ms: float = 0.0,
        speculative_tokens: int = 0,
        max_waiting: int = 64,
        observer: GenerationObserver | None = None,
    ) -> None:
        self.model = model
        self.executor = executor
        self.n_batch = n_batch
        self.budget = StepBudget(itl_target_ms / 1000, n_batch)
        self.cost = StepCost()
        self.reuse = 1.0  # the share of an idle cache the prompt that next takes its slot reuses (smoothed)
        self.speculative_tokens = speculative_tokens
        self.max_waiting = max_waiting
        self._observer = observer
        self._slots = [_Slot(i) for i in range(min(max_num_seqs, executor.n_seq))]
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # set by the loop when nothing runs or waits (`drain` waits for it)
        self._idle.set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llm-{model}")
        self._text_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"llm-text-{model}")
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- public -------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"scheduler-{self.model}")
        self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        # A bug in the loop must not leave clients waiting forever: log it and fail them all.
        if task.cancelled() or task.exception() is None:
            return
        log.error("scheduler stopped", exc_info=task.exception(), extra={"model": self.model})
        for sequence in [*self._running, *self._waiting]:
            self._finish(sequence, error=ExecutorError("the generation engine failed"))
        self._waiting.clear()
        self._idle.set()

    def wake(self) -> None:
        self._wakeup.set()

    async def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> Prompt:
        """The chat and its tools in the model's template (`engine/prompt.py`), rendered off the loop."""
        return await self._off_loop(lambda executor, chat: chat_prompt(executor, chat, tools), messages)

    async def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, tokenized off the event loop: a long prompt takes a while."""
        return await self._off_loop(encode, prompt)

    async def json_grammar(self, schema: Mapping[str, Any] | None) -> Grammar:
        """The grammar of JSON valid under `schema` (None: any object), built off the event loop: a
        schema's conversion and the grammar's compilation take milliseconds. Raises InvalidInput."""
        return await self._off_loop(_json_grammar, schema)

    async def _off_loop(self, work: Callable[[LlmExecutor, Arg], Result], arg: Arg) -> Result:
        if self._closed:
            raise Unloaded(f"model {self.model!r} was unloaded; retry shortly")
        future = self._text_pool.submit(work, self.executor, arg)
        return await asyncio.wrap_future(future)

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        max_tokens: int,
        stop: Sequence[str],
        timeout_s: float,
        tenant: str = "",
        logprobs: int | None = None,
        echo: bool = False,
        grammar: Grammar | None = None,
        choice_of: Generation | None = None,
    ) -> Generation:
        """Queue a generation. Raises InvalidInput when it cannot fit the context, Overloaded when full.

        `tenant` names whose cached prefixes the prompt may reuse: only those of the same tenant.
        `logprobs`: score every generated token, with that many alternatives; `echo`: score the prompt's
        tokens too. `max_tokens` 0 (with `echo`): the prompt is only scored. `grammar` (from
        `json_grammar`): every token drawn is one it allows, and the answer ends only where it may.
        `choice_of`: a generation of the same prompt submitted just before (one of a request's `n`
        choices): this one waits for that one's prompt to be in the cache and shares its cells (seq_cp),
        so the prompt is computed once for all the choices.
        """
        if self._closed:
            raise Unloaded(f"model {self.model!r} was unloaded; retry shortly")
        if not prompt:
            raise InvalidInput("the prompt is empty")
        room = self.executor.n_ctx_seq - len(prompt)  # n_ctx_seq <= n_cells: what fits a slot fits the pool
        if room <= 0:
            raise InvalidInput(
                f"the prompt has {len(prompt)} tokens; this model's context holds {self.executor.n_ctx_seq}"
            )
        if max_tokens > room:
            raise InvalidInput(
                f"max_tokens {max_tokens} plus the prompt's {len(prompt)} tokens exceed the context of "
                f"{self.executor.n_ctx_seq} tokens"
            )
        if len(self._waiting) >= self.max_waiting:
            raise Overloaded(f"model {self.model!r} has {len(self._waiting)} requests waiting; retry shortly")
        sequence = _Sequence(
            prompt,
            params,
            max_tokens,
            time.monotonic() + timeout_s,
            TextStream(stop),
            tenant,
            logprobs,
            echo,
            grammar,
            None if choice_of is None else choice_of._sequence,
        )
        if (tracer := tracing.tracer) is not None:
            sequence.trace = tracer.generation()
        self._waiting.append(sequence)
        self._idle.clear()
        self.wake()
        return Generation(sequence, self)

    async def drain(self) -> None:
        """Let what runs and waits finish, each generation within its own deadline, then close: the model
        was replaced by another version (the registry sends new requests there already)."""
        while (self._running or self._waiting) and self._task is not None and not self._task.done():
            await self._idle.wait()
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.remove_done_callback(self._stopped)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for sequence in [*self._running, *self._waiting]:
            self._finish(sequence, error=Overloaded(f"model {self.model!r} was unloaded"))
        # A step or a tokenization in flight reads the model: it finishes before the model is freed,
        # waited for off the loop (a long prompt's step takes seconds, and the node serves on meanwhile).
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        await asyncio.to_thread(self._text_pool.shutdown, wait=True)
        self.executor.close()

    # -- the loop ---------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._retire()
            self._admit()
            self._observe_state()
            if not self._running:
                if not self._waiting:
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            items, owners, filled = self._plan()
            try:
                outcomes, seconds = await loop.run_in_executor(self._pool, self._step, items, owners)
            except Exception:
                log.exception("decode step failed", extra={"model": self.model})
                for sequence in list(self._running):
                    self._finish(sequence, error=ExecutorError("the model failed during generation"))
                    self._forget_slot(sequence)
                continue
            tokens = sum(len(i.tokens) for i in items)
            self.budget.observe(tokens, seconds, filled=filled)
            self.cost.observe(tokens, seconds)
            self._apply(items, owners, outcomes)
            self._trim_idle(tokens)

    def _retire(self) -> None:
        """Drop cancelled and expired sequences, waiting or running; their slots become free."""
        now = time.monotonic()
        for sequence in [s for s in self._waiting if s.cancelled or s.deadline < now]:
            self._waiting.remove(sequence)
            self._finish(sequence, error=None if sequence.cancelled else self._late(sequence))
        for sequence in [s for s in self._running if s.cancelled or s.deadline < now]:
            self._finish(sequence, error=None if sequence.cancelled else self._late(sequence))

    def _late(self, sequence: _Sequence) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"generation did not finish within its deadline ({len(sequence.generated)} tokens)"
        )

    def _reserved(self, slot: _Slot) -> int:
        """The cells `slot` holds, or may come to hold while its sequence runs."""
        owner = slot.owner
        return len(slot.tokens) if owner is None else len(owner.prompt) + owner.max_tokens

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s in self._slots if s.owner is None]
            if not free:
                return
            running = sum(self._reserved(s) for s in self._slots if s.owner is not None)
            if running + len(self._waiting[0].prompt) + self._waiting[0].max_tokens > self.executor.n_cells:
                return  # it waits for running sequences to finish; idle caches alone would not make room
            leader = self._waiting[0].leader
            if leader is not None and not leader.done and leader.prefilled < len(leader.prompt):
                return  # its prompt is being computed for another choice: it shares those cells next
            sequence = self._waiting.popleft()
            # At least the prompt's last token is decoded again: its logits give the first token.
            longest = len(sequence.prompt) - 1
            own = [s for s in self._slots if s.tenant == sequence.tenant]
            donor = max(own, key=lambda s: common_prefix(s.tokens, sequence.prompt), default=None)
            common = common_prefix(donor.tokens, sequence.prompt) if donor is not None else 0
            reuse = 0 if sequence.echo else min(common, longest)  # echo needs every prompt row
            if (
                donor is not None
                and donor.owner is None
                and reuse > 0
                and (common == len(donor.tokens) or len(free) == 1)
            ):
                slot = donor  # continue where the cache ends: nothing else of it would be lost
            else:
                # Evict the free slot whose cache is worth least (empty first, then idle longest);
                # the donor keeps its cache, and shares the common prefix with the new sequence.
                slot = min(free, key=lambda s: (len(s.tokens) > 0, s.released_at))
            self._learn_fate(slot, donor, reuse)
            self.executor.forget(slot.index, 0 if slot is not donor else reuse)
            if slot is donor:
                del slot.tokens[reuse:]
            else:
                slot.tokens.clear()
                if donor is not None and reuse > 0:
                    self.executor.share(donor.index, slot.index, reuse)
                    slot.tokens.extend(donor.tokens[:reuse])
            slot.tenant = sequence.tenant
            slot.owner = sequence
            slot.rent = 0.0
            sequence.slot = slot.index
            sequence.prefilled = reuse
            if sequence.trace is not None:
                sequence.trace.admit()
            sequence.usage.cached_tokens = reuse
            self._running.append(sequence)
            self._make_room()

    def _trim_idle(self, tokens: int) -> None:
        """Give up idle caches that cost the running streams more than they are likely to save.

        Every cell in the pool is attended by every token decoded (llama.cpp masks other sequences' cells
        but reads them), so an idle slot's cache costs each step `executor.cell_cost` of a token per cell
        and token. Computing a cell again costs about one token. The cache is kept until the rent paid
        reaches what it would save, the share of it the next prompt reuses (`reuse`, learned from what
        became of idle caches) of a token per cell: the ski-rental rule, never more than twice the best
        choice made knowing the future. Cells a running stream shares (a common system prompt) cost no
        more kept, and stay.
        """
        if self.executor.cell_cost <= 0:
            return
        limit = max(self.reuse, _REUSE_FLOOR) / self.executor.cell_cost
        running = [s for s in self._slots if s.owner is not None]
        for slot in self._slots:
            if slot.owner is not None or not slot.tokens:
                continue
            slot.rent += tokens
            if slot.rent < limit:
                continue
            slot.rent = 0.0
            shared = (common_prefix(slot.tokens, s.tokens) for s in running if s.tenant == slot.tenant)
            keep = max(shared, default=0)
            if keep < len(slot.tokens):
                self._learn_reuse(0.0)
                del slot.tokens[keep:]
                self.executor.forget(slot.index, keep)

    def _learn_fate(self, slot: _Slot, donor: _Slot | None, reuse: int) -> None:
        """What became of idle caches as a prompt took `slot`, reusing `reuse` tokens of `donor`'s."""
        if slot.tokens:  # the slot's cache ends here, reused as far as the prompt follows it
            self._learn_reuse((reuse if slot is donor else 0) / len(slot.tokens))
        if donor is not None and donor is not slot and donor.owner is None and reuse:
            self._learn_reuse(reuse / len(donor.tokens))  # an idle cache shared its prefix

    def _learn_reuse(self, share: float) -> None:
        self.reuse += _REUSE_SMOOTHING * (share - self.reuse)

    def _make_room(self) -> None:
        """Drop idle slots' caches, least recently used first, until every reservation fits the pool."""
        idle = sorted((s for s in self._slots if s.owner is None and s.tokens), key=lambda s: s.released_at)
        excess = sum(self._reserved(s) for s in self._slots) - self.executor.n_cells
        for slot in idle:
            if excess <= 0:
                return
            excess -= len(slot.tokens)
            slot.tokens.clear()
            self.executor.forget(slot.index, 0)

    def _plan(self) -> tuple[list[DecodeItem], list[_Sequence], bool]:
        """The next step: the running streams' tokens, then prompt chunks, oldest prompt first, as far
        as the budget goes, then the streams' drafts where they pay; and whether the chunks filled the
        room (a prompt token had to wait)."""
        items: list[DecodeItem] = []
        owners: list[_Sequence] = []
        for sequence in self._running:
            if sequence.pending is not None:
                slot = self._slots[sequence.slot or 0]
                items.append(DecodeItem(slot.index, [sequence.pending], len(slot.tokens), True))
                owners.append(sequence)
        decoding = len(items)
        room = self.budget.room(decoding)
        filled = False
        # The oldest prompt is finished first, the next one starts in what its last chunk leaves over:
        # the first ones get their first token sooner than if every prompt advanced a little each step.
        for sequence in self._running:
            if sequence.pending is not None:
                continue
            if room <= 0:
                filled = True
                break
            take = min(room, ECHO_CHUNK) if sequence.echo else room
            chunk = sequence.prompt[sequence.prefilled : sequence.prefilled + take]
            last = sequence.prefilled + len(chunk) == len(sequence.prompt)
            scored = sequence.echo
            items.append(DecodeItem(sequence.slot or 0, chunk, sequence.prefilled, last or scored, scored))
            owners.append(sequence)
            if not last:  # the room is filled unless an echo chunk's bound stopped short of it
                filled = take == room
                break
            room -= len(chunk)
        if self.speculative_tokens:
            self._draft(items, owners, decoding)
        return items, owners, filled

    def _draft(self, items: list[DecodeItem], owners: list[_Sequence], decoding: int) -> None:
        """Put drafts (`engine/lookup.py`) behind the streams' tokens in the first `decoding` items, as
        many as raise the step's expected tokens per second.

        A step of n tokens takes a + b·n (`StepCost`) and is expected to give y tokens: one per stream,
        plus each draft token's chance of being kept, taken as the stream's acceptance to the power of
        the token's place in its draft (every token before it must be kept too). A draft token adds b
        seconds and p tokens, so it pays when p > y·b / (a + b·n): the most likely ones are added first
        while that holds. One stream alone on two cores pays for tokens kept more than about a quarter
        of the time; eight streams, for hardly any. Drafts also stay within the step's token budget
        (`StepBudget.spare`): a draft that pays in throughput must not stretch every stream's gap past
        the inter-token latency target.
        """
        line = self.cost.line()
        for sequence in owners[:decoding]:
            if sequence.lookup is None:
                sequence.lookup = PromptLookup([*sequence.prompt, *sequence.generated])
            sequence.guess = sequence.lookup.draft(self.speculative_tokens)
        if line is None:
            return
        fixed, per_token = line
        tokens = sum(len(i.tokens) for i in items)
        limit = tokens + self.budget.spare(tokens)
        expected = float(decoding)
        # (-chance, item index, place in the draft): the most likely next draft token first
        heap: list[tuple[float, int, int]] = []
        bounds: list[int] = []
        for index, (item, sequence) in enumerate(zip(items[:decoding], owners, strict=False)):
            # No draft beyond what the sequence reserved (max_tokens) or its context holds.
            most = min(
                len(sequence.guess),
                sequence.max_tokens - len(sequence.generated),
                self.executor.n_ctx_seq - 1 - item.pos,
            )
            bounds.append(most)
            if most > 0:
                heap.append((-sequence.acceptance, index, 1))
        heapq.heapify(heap)
        lengths = [0] * decoding
        while heap and tokens < limit:
            chance, index, place = heapq.heappop(heap)
            if -chance <= expected * per_token / (fixed + per_token * tokens):
                break
            lengths[index] = place
            expected -= chance
            tokens += 1
            if place < bounds[index]:
                heapq.heappush(heap, (chance * owners[index].acceptance, index, place + 1))
        for index, length in enumerate(lengths):
            if length:
                item = items[index]
                drafted = [*item.tokens, *owners[index].guess[:length]]
                items[index] = DecodeItem(item.seq, drafted, item.pos, True, every=True)

    def _step(self, items: list[DecodeItem], owners: list[_Sequence]) -> tuple[list[_Outcome], float]:
        """Worker thread: one forward pass, then what each item gave: the next token where a prompt
        ended or a stream decoded (and, behind a stream's token, the drafts its samples agreed with:
        the first disagreement is the next token, and the cells of the drafts after it are dropped),
        and scores where they were asked for; and the seconds it all took (the step's share of every
        running stream's inter-token gap)."""
        start = time.perf_counter()
        rows = iter(self.executor.decode(items))
        outcomes = []
        for item, sequence in zip(items, owners, strict=True):
            outcome = _Outcome()
            outcomes.append(outcome)
            if not item.logits:
                continue
            mine = [next(rows) for _ in item.tokens] if item.every else [next(rows)]
            if sequence.pending is not None:
                self._verify(item, sequence, mine, outcome)
                continue
            if item.every:  # the row at position p scores the prompt's token p + 1
                top = sequence.logprobs or 0
                ahead = sequence.prompt[item.pos + 1 : item.pos + 1 + len(mine)]
                outcome.prompt_scores = [score(row, t, top) for row, t in zip(mine, ahead, strict=False)]
            if item.pos + len(item.tokens) == len(sequence.prompt):
                self._take(mine[-1], sequence, outcome)
        return outcomes, time.perf_counter() - start

    def _verify(
        self, item: DecodeItem, sequence: _Sequence, rows: list[np.ndarray], outcome: _Outcome
    ) -> None:
        """Sample each row as if the drafts before it were the stream's own tokens, as long as they were."""
        drafts = item.tokens[1:]
        for place, row in enumerate(rows):
            token = self._take(row, sequence, outcome)
            if place == len(drafts) or token != drafts[place] or self.executor.is_end(token):
                break
        kept = len(outcome.tokens)  # the stream's token and the drafts that matched
        if kept < len(item.tokens):
            self.executor.forget(item.seq, item.pos + kept)

    def _take(self, row: np.ndarray, sequence: _Sequence, outcome: _Outcome) -> int:
        token = self._sample(row, sequence, [*sequence.generated, *outcome.tokens])
        outcome.tokens.append(token)
        if sequence.logprobs is not None:
            outcome.scores.append(score(row, token, sequence.logprobs))
        return token

    def _sample(self, row: np.ndarray, sequence: _Sequence, history: list[int]) -> int:
        """The sequence's next token after `history` (what it generated, and the drafts kept before it).

        With a grammar, a drawn token it refuses sends the draw to the row it constrains (the same as
        drawing from that row: `executors/llama_grammar.py`), and the grammar takes the token. While
        end tokens are banned (`ignore_eos`, or fewer than `min_tokens` generated) a drawn end token is
        struck out and the draw repeated: the same as drawing from the distribution without it
        (llama.cpp's server bans them with a logit bias). The executor's logits buffer is never written.
        """
        params, grammar = sequence.params, sequence.grammar
        token = sample(row, params, sequence.rng, history)
        if grammar is not None and not grammar.allows(token):
            row = grammar.constrain(row)
            token = sample(row, params, sequence.rng, history)
        if params.ignore_eos or len(history) < params.min_tokens:
            row = row.copy()
            while self.executor.is_end(token):
                row[token] = -np.inf
                token = sample(row, params, sequence.rng, history)
        if grammar is not None:
            grammar.accept(token)
        return token

    def _apply(self, items: list[DecodeItem], owners: list[_Sequence], outcomes: list[_Outcome]) -> None:
        now = time.perf_counter()
        for item, sequence, outcome in zip(items, owners, outcomes, strict=True):
            slot = self._slots[item.seq]
            if sequence.pending is not None:
                self._advance(item, sequence, slot, outcome, now)
                continue
            slot.tokens.extend(item.tokens)
            sequence.prefilled += len(item.tokens)
            sequence.prompt_scores += outcome.prompt_scores
            if not outcome.tokens or sequence.done:
                continue
            self._observe_first(sequence, now)
            if sequence.trace is not None:
                sequence.trace.first_token()
            if sequence.max_tokens == 0:  # the prompt was only to be scored
                self._finish(sequence, reason="length")
                continue
            sequence.last_token_at = now
            self._accept(sequence, slot, outcome.tokens[0], outcome.scores[0] if outcome.scores else None)
        self._observe_step(sum(len(i.tokens) for i in items))

    def _advance(
        self, item: DecodeItem, sequence: _Sequence, slot: _Slot, outcome: _Outcome, now: float
    ) -> None:
        """A stream's step: its token (and the drafts kept) now in the cache, the tokens sampled taken."""
        self._learn_acceptance(sequence, outcome.tokens, len(item.tokens) - 1)
        if sequence.done:
            slot.tokens.extend(item.tokens[: len(outcome.tokens)])
            return
        self._observe_token(now - sequence.last_token_at)
        sequence.last_token_at = now
        for place, token in enumerate(outcome.tokens):
            slot.tokens.append(item.tokens[place])
            self._accept(sequence, slot, token, outcome.scores[place] if outcome.scores else None)
            if sequence.done:
                break
        cached = item.pos + len(outcome.tokens)
        if len(slot.tokens) < cached:  # it finished before all the drafts kept: their cells go
            self.executor.forget(slot.index, len(slot.tokens))

    @staticmethod
    def _learn_acceptance(sequence: _Sequence, sampled: list[int], drafted: int) -> None:
        """Compare the lookup's guess with what was sampled: every drafted token up to the first miss,
        or, without drafts, the first guessed token alone (so a stream whose drafts do not pay now can
        still show that they would)."""
        for place, guessed in enumerate(sequence.guess[: max(drafted, 1)]):
            if place >= len(sampled):
                return
            hit = sampled[place] == guessed
            sequence.acceptance += _DRAFT_SMOOTHING * (hit - sequence.acceptance)
            if not hit:
                return

    def _accept(self, sequence: _Sequence, slot: _Slot, token: int, scored: TokenLogprob | None) -> None:
        if self.executor.is_end(token):
            sequence.pending = None
            self._finish(sequence, reason="stop")
            return
        sequence.generated.append(token)
        if sequence.lookup is not None:
            sequence.lookup.extend([token])
        sequence.usage.completion_tokens = len(sequence.generated)
        if scored is not None:
            sequence.scores.append(scored)
        text = sequence.text.push(self.executor.piece(token))
        if sequence.text.stopped:
            sequence.events.put_nowait(Event(text, logprobs=self._take_scores(sequence)))
            self._finish(sequence, reason="stop")
            return
        if text:
            sequence.events.put_nowait(Event(text, logprobs=self._take_scores(sequence)))
        if len(sequence.generated) >= sequence.max_tokens or len(slot.tokens) + 1 >= self.executor.n_ctx_seq:
            self._finish(sequence, reason="length")
            return
        sequence.pending = token

    def _finish(
        self, sequence: _Sequence, *, reason: str | None = None, error: EdgegenError | None = None
    ) -> None:
        if sequence.done:
            return
        sequence.done = True
        if sequence.trace is not None:
            outcome = reason or ("error" if error is not None else "cancelled")
            usage = sequence.usage
            sequence.trace.end(outcome, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
        if error is not None:
            sequence.events.put_nowait(Event(error=error))
        elif reason is not None:
            sequence.events.put_nowait(
                Event(sequence.text.finish(), finish_reason=reason, logprobs=self._take_scores(sequence))
            )
        if sequence in self._running:
            self._running.remove(sequence)
        if sequence.slot is not None:
            slot = self._slots[sequence.slot]
            slot.owner = None
            slot.released_at = time.monotonic()
            slot.rent = 0.0

    @staticmethod
    def _take_scores(sequence: _Sequence) -> list[TokenLogprob]:
        scores, sequence.scores = sequence.scores, []
        return scores

    def _forget_slot(self, sequence: _Sequence) -> None:
        if sequence.slot is not None:
            slot = self._slots[sequence.slot]
            slot.tokens.clear()
            self.executor.forget(slot.index, 0)

    # -- observation ---------------------------------------------------------------------------------------
    def _observe_first(self, sequence: _Sequence, now: float) -> None:
        if self._observer is not None:
            try:
                self._observer.on_first_token(
                    self.model, now - sequence.submitted, len(sequence.prompt), sequence.usage.cached_tokens
                )
            except Exception:
                log.exception("generation observer failed")

    def _observe_token(self, seconds: float) -> None:
        if self._observer is not None:
            try:
                self._observer.on_token(self.model, seconds)
            except Exception:
                log.exception("generation observer failed")

    def _observe_step(self, tokens: int) -> None:
        if self._observer is not None:
            try:
                self._observer.on_step(self.model, tokens)
            except Exception:
                log.exception("generation observer failed")

    def _observe_state(self) -> None:
        if self._observer is not None:
            try:
                kv_used = sum(len(s.tokens) for s in self._slots)
                kv_wanted = sum(self._reserved(s) for s in self._slots if s.owner is not None)
                if self._waiting:
                    kv_wanted += len(self._waiting[0].prompt) + self._waiting[0].max_tokens
                self._observer.on_state(
                    self.model,
                    len(self._running),
                    len(self._waiting),
                    kv_used,
                    self.executor.n_cells,
                    kv_wanted,
                )
            except Exception:
                log.exception("generation observer failed")
