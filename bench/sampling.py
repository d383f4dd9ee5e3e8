"""Time the sampler on real logits: SmolLM2's rows over a generated answer, several parameter sets.

The rows come from the store's `smollm2-135m` (greedy decoding of one chat prompt, 64 rows), so the
distributions are a language model's, not synthetic; each parameter set is timed over all rows, `--repeat`
times, and the median per-token cost is printed with its min–max. To compare two trees, run it with each
tree's `src` first on PYTHONPATH (the rows are the same: greedy decoding, one thread).

    .venv/bin/python bench/sampling.py --model PATH/model.gguf [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from edgegen.config import LlmSettings
from edgegen.engine.sampling import SamplingParams, sample
from edgegen.executors.base import DecodeItem
from edgegen.executors.llamacpp import LlamaExecutor

PROMPT = (
    "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PARAMS = {
    "greedy": SamplingParams(temperature=0),
    "t0.8": SamplingParams(temperature=0.8),
    "t0.8 top_p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
    "t1.0 top_p 0.9": SamplingParams(temperature=1.0, top_p=0.9),
    "t0.8 top_k 40": SamplingParams(temperature=0.8, top_k=40),
    "t0.7 top_p 0.95 rep 1.1": SamplingParams(temperature=0.7, top_p=0.95, repetition_penalty=1.1),
}


def logit_rows(model: Path, n: int) -> list[np.ndarray]:
    executor = LlamaExecutor(model, LlmSettings(threads=1, max_num_seqs=1, ctx_per_seq=512))
    prompt = executor.tokenize(PROMPT, special=True)
    rows = [executor.decode([DecodeItem(0, prompt, 0, True)])[0].copy()]
    for pos in range(len(prompt), len(prompt) + n - 1):
        token = int(np.argmax(rows[-1]))
        rows.append(executor.decode([DecodeItem(0, [token], pos, True)])[0].copy())
    executor.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = logit_rows(args.model, 64)
    history = list(range(100, 200))  # a penalty has 100 tokens of history to look at
    for name, params in PARAMS.items():
        costs = []
        for _ in range(args.repeat):
            rng = np.random.default_rng(0)
            started = time.perf_counter()
            for row in rows:
                sample(row, params, rng, history)
            costs.append((time.perf_counter() - started) / len(rows) * 1000)
        print(f"{name:26s} {statistics.median(costs):6.3f} ms/token ({min(costs):.3f}–{max(costs):.3f})")


if __name__ == "__main__":
    main()
