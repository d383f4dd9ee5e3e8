"""The pieces of the `lm` task: GGUF requantization, depth pruning, and scoring on the node's executor.

    held-out text (stdlib docstrings) → tokens
    base GGUF ─quantize_gguf→ reference (F16) ─quantize_gguf→ Q8_0, Q4_K_M, …
                                              ─drop_layers→ fewer blocks ─quantize_gguf→ …
    each file → Scorer: perplexity over fixed chunks, decode ms/token (greedy, one sequence)

Scoring runs on `LlamaExecutor`, the class the node serves GGUF models with, so the figures are the
ones a node on this machine gets. Perplexity follows llama.cpp's own tool: the text is cut into
chunks of `ctx` tokens, each evaluated from an empty cache, and only the second half of each chunk
is scored, so every scored token has at least ctx/2 tokens of context.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import math
import statistics
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import llama_cpp as llama
import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from edgegen.config import KvType, LlmSettings
from edgegen.errors import ConfigError, ExecutorError
from edgegen.executors.base import DecodeItem
from edgegen.executors.llamacpp import LlamaExecutor, init_backend
from edgegen.optimize.recipe import GGUF_TYPES

# A fixed list, so the text changes only with the Python version (recorded beside every figure).
STDLIB_MODULES: tuple[str, ...] = (
    "argparse", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "enum", "fractions", "functools", "heapq", "ipaddress", "itertools", "json",
    "pathlib", "pprint", "shlex", "statistics", "string", "textwrap", "random", "zipfile",
)  # fmt: skip

GGUF_FTYPES: dict[str, int] = {
    name: getattr(llama, f"LLAMA_FTYPE_{'ALL' if name == 'F32' else 'MOSTLY'}_{name}") for name in GGUF_TYPES
}

_BLOCK = "blk."


def heldout_text(modules: Sequence[str] = STDLIB_MODULES) -> str:
    """The docstrings of `modules` and of their public classes and functions, in a fixed order."""
    parts: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"the held-out text needs the standard library module {name!r}") from None
        if doc := inspect.getdoc(module):
            parts.append(doc)
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(value, "__module__", None) != name:
                continue
            if (inspect.isclass(value) or inspect.isfunction(value)) and (doc := inspect.getdoc(value)):
                parts.append(doc)
    return "\n\n".join(parts)


def quantize_gguf(source: Path, dest: Path, type_name: str, threads: int) -> None:
    """llama.cpp's own quantizer; an already quantized source is dequantized first (requantization)."""
    init_backend()
    params = llama.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = GGUF_FTYPES[type_name]
    params.allow_requantize = True
    status = llama.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    if status != 0 or not dest.is_file():
        raise ExecutorError(f"llama.cpp could not quantize {source.name} to {type_name}")


def drop_layers(source: Path, dest: Path, drop: Collection[int]) -> int:
    """Copy a GGUF without the transformer blocks in `drop`, renumbering the rest; return the new count.

    Metadata is copied field by field; per-layer arrays (one value per block) lose the dropped entries.
    """
    reader = GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    count_key = f"{arch}.block_count"
    n_layers = int(reader.fields[count_key].contents())
    if not drop or any(not 0 <= i < n_layers for i in drop) or len(set(drop)) >= n_layers:
        raise ConfigError(f"layers to drop must be distinct indices in 0..{n_layers - 1}, not all of them")
    keep = [i for i in range(n_layers) if i not in set(drop)]
    renumber = {old: new for new, old in enumerate(keep)}
    writer = GGUFWriter(dest, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        value = field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        if field.name == count_key:
            value = len(keep)
        elif field.name.startswith(f"{arch}.") and isinstance(value, list) and len(value) == n_layers:
            value = [value[i] for i in keep]
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    kept = []
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith(_BLOCK):
            layer, rest = name[len(_BLOCK) :].split(".", 1)
            if int(layer) not in renumber:
                continue
            name = f"{_BLOCK}{renumber[int(layer)]}.{rest}"
        kept.append(tensor)
        data = tensor.data
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in kept:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return len(keep)


class Scorer:
    """One GGUF loaded the way the node loads it, with one sequence of `ctx` positions."""

    def __init__(self, path: Path, ctx: int, threads: int, kv_type: KvType = "f16") -> None:
        settings = LlmSettings(max_num_seqs=1, ctx_per_seq=ctx, n_batch=ctx, threads=threads, kv_type=kv_type)
        self.executor = LlamaExecutor(path, settings)
        self.ctx = min(ctx, self.executor.n_ctx_seq)

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *_: object) -> None:
        self.executor.close()

    def tokenize(self, text: str) -> list[int]:
        return self.executor.tokenize(text, special=False)

    def perplexity(self, tokens: Sequence[int], chunks: int) -> float:
        """exp(mean negative log-likelihood) of the second half of each of the first `chunks` chunks."""
        ctx, half = self.ctx, self.ctx // 2
        if len(tokens) < chunks * ctx:
            raise ConfigError(f"{len(tokens)} tokens of held-out text: too few for {chunks} chunks of {ctx}")
        nll, scored = 0.0, 0
        for c in range(chunks):
            chunk = tokens[c * ctx : (c + 1) * ctx]
            self.executor.forget(0, 0)
            rows = self.executor.decode(
                [DecodeItem(0, [token], pos, logits=pos >= half - 1) for pos, token in enumerate(chunk)]
            )
            logits = np.stack(rows[:-1]).astype(np.float64)  # rows predict positions half … ctx-1
            top = logits.max(axis=1)
            log_z = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top
            targets = np.asarray(chunk[half:])
            nll += float((log_z - logits[np.arange(len(targets)), targets]).sum())
            scored += len(targets)
        return math.exp(nll / scored)

    def decode_ms(self, prompt: Sequence[int], new_tokens: int, runs: int) -> list[float]:
        """Milliseconds of each greedy decode step of one sequence (prompt prefilled first, untimed)."""
        steps: list[float] = []
        for _ in range(runs):
            self.executor.forget(0, 0)
            logits = self.executor.decode([DecodeItem(0, list(prompt), 0, logits=True)])[0]
            pos = len(prompt)
            for _ in range(new_tokens):
                token = int(np.argmax(logits))
                started = time.perf_counter()
                logits = self.executor.decode([DecodeItem(0, [token], pos, logits=True)])[0]
                steps.append((time.perf_counter() - started) * 1000)
                pos += 1
        return steps


def median_ms(samples: Sequence[float]) -> float:
    return round(statistics.median(samples), 4)
