"""The llama.cpp KV pool: sized from a budget, quantized on request, shared by sequences that wait for it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgegen.config import KvType, LlmSettings
from edgegen.engine.generation import Scheduler
from edgegen.engine.sampling import SamplingParams
from edgegen.executors.llamacpp import AUTO_KV_BYTES, KV_BYTES, LlamaExecutor, auto_kv_budget, kv_cells
from tests.llm_models import write_tiny_llama

# 2 layers x 2 KV heads x 32 values, K and V: 256 values a cell.
VALUES_PER_CELL = 2 * 2 * 2 * 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kv") / "tiny.gguf"
    return write_tiny_llama(path, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=128)


def test_the_pool_is_the_budget_never_less_than_a_context_nor_more_than_all_slots() -> None:
    settings = LlmSettings(max_num_seqs=8, ctx_per_seq=2048, kv_budget_mb=64)
    per_cell = 23_040.0  # SmolLM2-135M in f16
    assert kv_cells(settings, per_cell, 2048) == 2816  # 64 MiB / 23,040 B, in blocks of 256 cells
    assert kv_cells(settings.model_copy(update={"kv_budget_mb": 1}), per_cell, 2048) == 2048
    assert kv_cells(settings.model_copy(update={"kv_budget_mb": 4096}), per_cell, 2048) == 8 * 2048
    auto = kv_cells(settings.model_copy(update={"kv_budget_mb": 0}), per_cell, 2048)
    assert auto_kv_budget() <= AUTO_KV_BYTES
    assert auto == max(2048, int(auto_kv_budget() // per_cell) // 256 * 256)  # 32 MB of f16: one context


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_each_cache_type_loads_at_its_size_and_answers_like_f16(tiny: Path, kv_type: KvType) -> None:
    settings = LlmSettings(max_num_seqs=2, ctx_per_seq=256, n_batch=64, threads=1, kv_type=kv_type)
    executor = LlamaExecutor(tiny, settings)
    try:
        assert executor.kv_bytes_per_cell == VALUES_PER_CELL * KV_BYTES[kv_type]
        assert executor.n_cells == 2 * 256  # the default budget holds both slots' contexts of this model
    finally:
        executor.close()
    f16 = settings.model_copy(update={"kv_type": "f16"})
    assert _greedy(tiny, settings, ["the cat sat on"], 24) == _greedy(tiny, f16, ["the cat sat on"], 24)


def test_a_small_pool_makes_requests_wait_and_every_answer_is_its_own(tiny: Path) -> None:
    # 4 slots, a pool of 256 cells: two of these requests (~95 cells each) run at once, the rest wait.
    budget_mb = 256 * VALUES_PER_CELL * KV_BYTES["f16"] / 2**20
    settings = LlmSettings(
        max_num_seqs=4, ctx_per_seq=256, n_batch=64, threads=1, kv_budget_mb=budget_mb, kv_type="f16"
    )
    executor = LlamaExecutor(tiny, settings)
    assert executor.n_cells == 256
    executor.close()
    prompts = ["the cat sat on", "a dog ran to", "one two three", "we went home"]
    together = _greedy(tiny, settings, prompts, 90)
    assert together == [_greedy(tiny, settings, [p], 90)[0] for p in prompts]
    assert len(set(together)) == 4


def _greedy(model: Path, settings: LlmSettings, prompts: list[str], max_tokens: int) -> list[str]:
    """The prompts' greedy answers, generated at once by one scheduler over a freshly loaded model."""

    async def run() -> list[str]:
        executor = LlamaExecutor(model, settings)
        scheduler = Scheduler("tiny", executor, max_num_seqs=settings.max_num_seqs, n_batch=settings.n_batch)
        scheduler.start()

        async def one(prompt: str) -> str:
            tokens = executor.tokenize(prompt, special=False)
            greedy = SamplingParams(temperature=0)
            generation = scheduler.submit(tokens, greedy, max_tokens=max_tokens, stop=[], timeout_s=60)
            return "".join([event.text async for event in generation.events()])

        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await scheduler.close()  # frees the model too

    return asyncio.run(run())


def test_a_model_whose_heads_do_not_split_into_blocks_keeps_an_f16_cache(tmp_path: Path) -> None:
    odd = write_tiny_llama(tmp_path / "odd.gguf", n_embd=64, n_head=4, n_head_kv=2)  # heads of 16 values
    executor = LlamaExecutor(odd, LlmSettings(max_num_seqs=2, ctx_per_seq=256, threads=1, kv_type="q8_0"))
    try:
        assert executor.kv_type == "f16"
        assert executor.kv_bytes_per_cell == 2 * 2 * 2 * 16 * KV_BYTES["f16"]
    finally:
        executor.close()
