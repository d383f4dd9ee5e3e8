"""In-process references for the LLM benchmark: the one-stream floor, the batched ceiling, the memory bound.

floor     llama-cpp-python's own generation loop (`Llama.generate`, greedy), no HTTP: TTFT and decode tok/s
          of one stream. `reset()` before each run, so the prompt is prefilled cold every time.
ceiling   a bare loop over llama.cpp's batch API through our `LlamaExecutor` (the same ctypes wrapper
          the node uses): N prompts prefilled together (packed into decode calls of ≤ n_batch tokens),
          then the N sequences decoded together, argmax on each logits row; no scheduler, no HTTP;
          every run starts from an empty KV cache.
bound     memory bandwidth from a single-threaded numpy copy, against the bytes of the GGUF's tensors:
          at one stream every weight is read once per token, so bandwidth ÷ weight bytes caps tok/s.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from edgegen.config import LlmSettings
from edgegen.executors.base import DecodeItem
from edgegen.executors.llamacpp import LlamaExecutor


@dataclass
class InProcessRun:
    ttft_s: list[float]  # per sequence: start of the run to its first token
    decode_tps: list[float]  # per sequence: (tokens − 1) ÷ (last − first token time)
    tokens: int  # all sequences
    wall_s: float
    eos_at: list[int | None]  # where greedy decoding met an end token (ignored here), per sequence

    @property
    def aggregate_tps(self) -> float:
        return self.tokens / self.wall_s


# --- the floor: llama-cpp-python, one stream ----------------------------------------------------------------


class Floor:
    def __init__(self, model: Path, threads: int, n_ctx: int) -> None:
        self.llm = llama_cpp.Llama(str(model), n_threads=threads, n_ctx=n_ctx, verbose=False)

    def run(self, prompt: list[int], new_tokens: int) -> InProcessRun:
        """Greedy generation of exactly `new_tokens` tokens (an end token does not stop it)."""
        self.llm.reset()  # no prefix reuse from the previous run
        eos, eos_at = self.llm.token_eos(), None
        times: list[float] = []
        started = time.perf_counter()
        for i, token in enumerate(self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0)):
            times.append(time.perf_counter())
            if token == eos and eos_at is None:
                eos_at = i
            if len(times) == new_tokens:
                break
        decode = (len(times) - 1) / (times[-1] - times[0])
        return InProcessRun([times[0] - started], [decode], len(times), times[-1] - started, [eos_at])

    def close(self) -> None:
        self.llm.close()


# --- the ceiling: llama.cpp's batch API, N streams ----------------------------------------------------------


class Ceiling:
    def __init__(self, model: Path, settings: LlmSettings) -> None:
        self.executor = LlamaExecutor(model, settings)
        self.n_batch = settings.n_batch

    def run(self, prompts: list[list[int]], new_tokens: int) -> InProcessRun:
        ex = self.executor
        for seq in range(ex.n_seq):  # an empty cache: attention spans only these sequences' cells
            ex.forget(seq, 0)
        eos_at: list[int | None] = [None] * len(prompts)
        started = time.perf_counter()
        tokens, first_at = self._prefill(prompts)
        last_at = list(first_at)
        pos = [len(p) for p in prompts]
        for step in range(1, new_tokens):
            items = [DecodeItem(seq, [tokens[seq]], pos[seq], True) for seq in range(len(prompts))]
            rows = ex.decode(items)
            now = time.perf_counter()
            for seq, row in enumerate(rows):
                tokens[seq] = int(np.argmax(row))
                pos[seq] += 1
                last_at[seq] = now
                if eos_at[seq] is None and ex.is_end(tokens[seq]):
                    eos_at[seq] = step
        wall = max(last_at) - started
        decode = [(new_tokens - 1) / (last - first) for first, last in zip(first_at, last_at, strict=True)]
        ttft = [first - started for first in first_at]
        return InProcessRun(ttft, decode, new_tokens * len(prompts), wall, eos_at)

    def _prefill(self, prompts: list[list[int]]) -> tuple[list[int], list[float]]:
        """All prompts in decode calls of at most n_batch tokens; the first token of each, and when."""
        first: list[int] = [0] * len(prompts)
        first_at: list[float] = [0.0] * len(prompts)
        pending = [(seq, 0) for seq in range(len(prompts))]  # (sequence, tokens prefilled)
        while pending:
            items, owners, budget = [], [], self.n_batch
            while pending and budget > 0:
                seq, done = pending.pop(0)
                chunk = prompts[seq][done : done + budget]
                last = done + len(chunk) == len(prompts[seq])
                items.append(DecodeItem(seq, chunk, done, last))
                if last:
                    owners.append(seq)
                else:
                    pending.insert(0, (seq, done + len(chunk)))
                budget -= len(chunk)
            rows = self.executor.decode(items)
            now = time.perf_counter()
            for seq, row in zip(owners, rows, strict=True):
                first[seq], first_at[seq] = int(np.argmax(row)), now
        return first, first_at

    def close(self) -> None:
        self.executor.close()


# --- the bandwidth bound ------------------------------------------------------------------------------------


def gguf_tensor_bytes(model: Path) -> int:
    """Bytes of tensor data in the GGUF: what one decode step of one stream reads at least once."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(model)).tensors)


def copy_bandwidth(megabytes: int = 512, runs: int = 5) -> dict[str, float]:
    """Single-threaded `np.copyto` of a `megabytes` array; bytes moved counted as read + write (as STREAM)."""
    source = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in first
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(target, source)
        seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    return {
        "array_mib": megabytes,
        "runs": runs,
        "copy_s_median": median,
        "gb_per_s": 2 * source.nbytes / median / 1e9,
        "gb_per_s_best": 2 * source.nbytes / min(seconds) / 1e9,
    }
