"""Prompt-lookup drafts through llama.cpp: verified in the same batch as the stream's token, refused
drafts' cells removed, and every answer byte for byte the one decoding token by token gives.

llama.cpp's attention sums a sequence's cells in the order they sit in the pool, so the same tokens in
other cells give logits that differ in the last digits (SmolLM2-135M: up to 0.5; this tiny model: 6e-4,
against gaps of several units between its top logits). Refused drafts free cells that another stream's
next token may take, so answers are compared greedy with streams running together, where no near-tie
can turn, and sampled one request at a time, where every layout is the same with drafts or without.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from edgegen.config import LlmSettings
from edgegen.engine.generation import Scheduler
from edgegen.engine.sampling import SamplingParams
from edgegen.executors.base import DecodeItem
from edgegen.executors.llamacpp import LlamaExecutor
from tests.llm_models import write_tiny_llama

SETTINGS = LlmSettings(max_num_seqs=4, ctx_per_seq=512, n_batch=64, threads=1, kv_type="f16")
BEGINNINGS = ["the cat sat on", "one two three", "we went home", "a dog ran to"]


class CountingDrafts(LlamaExecutor):
    """The llama.cpp executor, counting the tokens each stream's item carried."""

    def __init__(self, path: Path, settings: LlmSettings) -> None:
        super().__init__(path, settings)
        self.decode_items: list[int] = []

    def decode(self, items: Sequence[DecodeItem]) -> list[np.ndarray]:
        self.decode_items += [len(i.tokens) for i in items if i.every and len(i.tokens) <= 8]
        return super().decode(items)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("drafts") / "tiny.gguf", n_embd=128, n_ff=256)


def _answers(
    model: Path, drafts: int, params: SamplingParams, prompts: list[str], *, together: bool = True
) -> tuple[list[tuple[str, int]], list[int]]:
    async def run() -> tuple[list[tuple[str, int]], list[int]]:
        executor = CountingDrafts(model, SETTINGS)
        scheduler = Scheduler("tiny", executor, max_num_seqs=4, n_batch=64, speculative_tokens=drafts)
        scheduler.start()

        async def one(prompt: str, max_tokens: int) -> tuple[str, int]:
            tokens = executor.tokenize(prompt, special=False)
            generation = scheduler.submit(tokens, params, max_tokens=max_tokens, stop=[], timeout_s=60)
            text = "".join([event.text async for event in generation.events()])
            return text, generation.usage.completion_tokens

        try:
            if together:
                answers = await asyncio.gather(*(one(p, 60 + 9 * i) for i, p in enumerate(prompts)))
            else:
                answers = [await one(p, 60 + 9 * i) for i, p in enumerate(prompts)]
            return list(answers), executor.decode_items
        finally:
            await scheduler.close()

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("params", "together"),
    [(SamplingParams(temperature=0), True), (SamplingParams(temperature=0.9, top_k=20, seed=7), False)],
)
def test_drafts_verified_by_llama_cpp_change_no_answer(
    tiny: Path, params: SamplingParams, together: bool
) -> None:
    # The model's own continuation of each beginning, then the beginning again: it goes on repeating
    # what it wrote, where the lookup's drafts are kept (and refused where sampling goes elsewhere).
    continued, _ = _answers(tiny, 0, SamplingParams(temperature=0), BEGINNINGS)
    prompts = [f"{b}{text} {b}" for b, (text, _) in zip(BEGINNINGS, continued, strict=True)]
    without, _ = _answers(tiny, 0, params, prompts, together=together)
    drafted, items = _answers(tiny, 4, params, prompts, together=together)
    assert drafted == without
    assert sum(n - 1 for n in items) > 20, "hardly any drafts were sent"
