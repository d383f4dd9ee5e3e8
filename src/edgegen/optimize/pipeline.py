"""Run a recipe: train the teacher, apply each step, and measure every package on this machine.

(This is the digits task; an lm recipe runs in `lm_task`. Both share the output directory's life:
built beside its target and renamed into place at the end.)

Every package is a store package (`model.onnx` + `manifest.json`, ready for `edgegen models add`).
Its figures are measured, not estimated: parameters (and how many are non-zero), file size, ONNX Runtime
latency p50 at batch 1 and 64 (one intra-op thread), and test accuracy. The output directory is built
beside its target and renamed into place at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import uuid
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

from edgegen import __version__
from edgegen.errors import ConfigError
from edgegen.executors import describe_model
from edgegen.modelkit.layers import DenseLayer, mlp_forward
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.modelkit.tflite_writer import mlp_to_tflite
from edgegen.optimize import budget, digits, lm_task, plots, report
from edgegen.optimize.engines import compare, litert_runner, onnxruntime_runner, p50_ms
from edgegen.optimize.quantize import quantize
from edgegen.optimize.recipe import DigitsRecipe, Distill, LmRecipe, LowRank, Prune, Quantize, Share
from edgegen.optimize.train import fresh_mlp, train
from edgegen.optimize.transforms import (
    low_rank,
    prune_neurons,
    prune_unstructured,
    share_weights,
    tie_layers,
)
from edgegen.store.store import manifest_for

Progress = Callable[[str], None]
INPUTS, CLASSES = 64, 10


def measure(model: Path, split: digits.Split, runs: int, reference: Sequence[DenseLayer]) -> dict[str, Any]:
    """Size, latency and accuracy of an exported model (ONNX Runtime for .onnx, LiteRT for .tflite), and
    its parity with the float layers it came from."""
    build = litert_runner if model.suffix == ".tflite" else onnxruntime_runner
    run = build(model.read_bytes())
    logits = run(split.x_test)
    accuracy = float((logits.argmax(1) == split.y_test).mean())
    # Export parity for a float package; for an int8 one, the error quantization added.
    max_abs_error = float(np.abs(logits - mlp_forward(reference, split.x_test)).max())

    return {
        "max_abs_error": round(max_abs_error, 6),
        "size_bytes": model.stat().st_size,
        # What a package costs to ship: sharing and sparsity show here, not in the dense file.
        "compressed_bytes": len(zlib.compress(model.read_bytes(), 9)),
        "latency_ms_p50": p50_ms(run, split.x_test[:1], runs),
        "latency_ms_p50_batch64": p50_ms(run, np.resize(split.x_test, (64, INPUTS)), runs),
        "accuracy": round(accuracy, 4),
    }


def _params(layers: Sequence[DenseLayer]) -> tuple[int, int]:
    """Parameters (and non-zero ones); a weight matrix tied across layers counts once."""
    weights = list({id(layer.weight): layer.weight for layer in layers}.values())
    biases = sum(layer.bias.size for layer in layers)
    return sum(w.size for w in weights) + biases, sum(int(np.count_nonzero(w)) for w in weights) + biases


def _package(root: Path, folder: str, model: Path, facts: dict[str, Any]) -> None:
    """Turn `root/folder/model.onnx` (or `.tflite`) into a store package with its facts in the manifest."""
    name = f"digits-{folder.split('-', 1)[-1]}"
    manifest = manifest_for(
        model, name, "1", metadata=facts, producer=f"edgegen {__version__} optimize", describe=describe_model
    )
    manifest.write(root / folder / "manifest.json")


def apply(
    step: Prune | LowRank | Share, layers: Sequence[DenseLayer], split: digits.Split, seed: int
) -> tuple[list[DenseLayer], dict[str, Any]]:
    """One float compression step (with its fine-tuning); ValueError where the model cannot take it."""
    x, y = split.x_train, split.y_train
    if isinstance(step, Prune):
        if step.method == "neurons":
            done = prune_neurons(layers, step.amount)
        else:
            done = prune_unstructured(layers, step.amount, method=step.method, scope=step.scope, seed=seed)
        out = done.layers
        if step.finetune_epochs:
            sparse = step.method != "neurons"  # unstructured pruning keeps its zeros while it recovers
            out = train(out, x, y, epochs=step.finetune_epochs, seed=seed, keep_zeros=sparse)
        return out, {**done.detail, "amount": step.amount, "finetune_epochs": step.finetune_epochs}
    if isinstance(step, LowRank):
        done = low_rank(layers, rank=step.rank, energy=step.energy)
        tune = step.finetune_epochs
        detail = dict(done.detail)
    elif step.method == "tie":
        done = tie_layers(layers)
        tune = step.finetune_epochs
        detail = {**done.detail, "method": "tie", "finetune_epochs": tune}
    else:
        done = share_weights(layers, step.clusters)
        tune = 0  # training would move the weights off their shared values
        detail = {**done.detail, "method": "cluster"}
    out = train(done.layers, x, y, epochs=tune, seed=seed) if tune else done.layers
    return out, detail


def quantize_to(
    step: Quantize, layers: Sequence[DenseLayer], split: digits.Split, seed: int, target: Path
) -> tuple[Sequence[DenseLayer], dict[str, Any]]:
    """Write the int8 model of `layers` to `target`; return the float layers it stands for and the detail.

    qat fine-tunes a copy through int8 rounding first; ONNX Runtime's static QDQ quantizer converts it.
    """
    detail: dict[str, Any] = {"mode": step.mode}
    if step.mode == "qat":
        layers = train(layers, split.x_train, split.y_train, epochs=step.epochs, seed=seed, fake_quant=True)
        detail["epochs"] = step.epochs
    source = target.with_name(f".float-{target.name}")
    source.write_bytes(mlp_to_onnx(layers, doc=f"edgegen optimize: int8-{step.mode}"))
    try:
        quantize(source, target, "dynamic" if step.mode == "dynamic" else "static",
                 calibration=split.x_train[: step.calibration_samples])  # fmt: skip
    finally:
        source.unlink()
    return layers, detail


def run(
    recipe: DigitsRecipe | LmRecipe,
    out: Path,
    progress: Progress = lambda _: None,
    *,
    max_accuracy_drop: float | None = None,
) -> dict[str, Any]:
    """Run the recipe into `out`; with `max_accuracy_drop` (points), also search for the fastest package
    within that drop from the teacher's accuracy (budget mode, digits only)."""
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another --out")
    if max_accuracy_drop is not None and isinstance(recipe, LmRecipe):
        raise ConfigError("--max-accuracy-drop applies to the digits task; an lm report ranks every package")
    if max_accuracy_drop is not None and not 0 <= max_accuracy_drop < 100:
        raise ConfigError(f"--max-accuracy-drop is in accuracy points, in [0, 100); got {max_accuracy_drop}")
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        if isinstance(recipe, LmRecipe):
            result = lm_task.run(recipe, staging, progress)
        else:
            result = _run(recipe, staging, progress, max_accuracy_drop)
        (staging / "report.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        (staging / "report.md").write_text(report.markdown(result), encoding="utf-8")
        plots.plot(result, staging)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _run(
    recipe: DigitsRecipe, root: Path, progress: Progress, max_drop: float | None = None
) -> dict[str, Any]:
    split = digits.load_split(seed=recipe.seed)
    scale = digits.PIXEL_MAX
    steps: list[dict[str, Any]] = []

    def emit(
        index: int, kind: str, layers: Sequence[DenseLayer], model: Path, detail: dict[str, Any]
    ) -> None:
        """Measure and package `model`, exported from (or quantized from) the float `layers`."""
        folder = model.parent.name
        figures = measure(model, split, recipe.latency_runs, layers)
        entry: dict[str, Any] = {"step": kind, "index": index, "package": folder, **figures, **detail}
        entry["params"], entry["nonzero_params"] = _params(layers)
        if recipe.tflite and not kind.startswith("int8"):
            # The same float model for LiteRT, through our own TFLite writer, measured on LiteRT.
            lite = root / f"{folder}-tflite" / "model.tflite"
            lite.parent.mkdir()
            lite.write_bytes(mlp_to_tflite(layers))
            lite_figures = measure(lite, split, recipe.latency_runs, layers)
            entry["tflite"] = {"package": lite.parent.name, **lite_figures}
            _package(root, lite.parent.name, lite, {"step": kind, "index": index, **lite_figures})
        _package(root, folder, model, {k: v for k, v in entry.items() if k != "package"})
        steps.append(entry)
        progress(f"{folder}: accuracy {figures['accuracy']:.4f}, {figures['size_bytes']} bytes, "
                 f"{figures['latency_ms_p50']:.3f} ms (batch 1)")  # fmt: skip

    def export(index: int, kind: str, layers: Sequence[DenseLayer]) -> Path:
        folder = root / f"{index:02d}-{kind}"
        folder.mkdir()
        path = folder / "model.onnx"
        path.write_bytes(mlp_to_onnx(layers, doc=f"edgegen optimize: {kind}"))
        return path

    progress("training the teacher")
    sizes = [INPUTS, *recipe.teacher.hidden, CLASSES]
    teacher = train(fresh_mlp(sizes, recipe.seed, scale), split.x_train, split.y_train,
                    epochs=recipe.teacher.epochs, seed=recipe.seed)  # fmt: skip
    emit(0, "teacher", teacher, export(0, "teacher", teacher), {})
    current = teacher
    starts: list[tuple[str, Sequence[DenseLayer]]] = [("teacher", teacher)]
    for index, step in enumerate(recipe.steps, start=1):
        detail: dict[str, Any] = {}
        if isinstance(step, Distill):
            progress(f"step {index}: distill into {step.hidden}")
            student_sizes = [INPUTS, *step.hidden, CLASSES]
            start = fresh_mlp(student_sizes, recipe.seed + index, scale)
            alone = train(start, split.x_train, split.y_train, epochs=step.epochs, seed=recipe.seed)
            current = train(start, split.x_train, split.y_train, epochs=step.epochs, seed=recipe.seed,
                            teacher=current, temperature=step.temperature, alpha=step.alpha)  # fmt: skip
            alone_path = export(index, "student-alone", alone)
            emit(
                index,
                "student-alone",
                alone,
                alone_path,
                {"note": "same architecture and epochs, no teacher"},
            )
            detail = {"temperature": step.temperature, "alpha": step.alpha, "hidden": step.hidden}
            starts.append(("distill", current))
        elif isinstance(step, Prune | LowRank | Share):
            progress(f"step {index}: {step.kind}")
            try:
                current, detail = apply(step, current, split, recipe.seed)
            except ValueError as exc:
                raise ConfigError(f"step {index} ({step.kind}): {exc}") from None
        elif isinstance(step, Quantize):
            progress(f"step {index}: quantize {step.mode}")
            folder = root / f"{index:02d}-int8-{step.mode}"
            folder.mkdir()
            quantized, detail = quantize_to(step, current, split, recipe.seed, folder / "model.onnx")
            emit(index, f"int8-{step.mode}", quantized, folder / "model.onnx", detail)
            continue
        emit(index, step.kind, current, export(index, step.kind, current), detail)
    searched = None if max_drop is None else _budget(recipe, root, split, starts, max_drop, progress)
    baseline = steps[0]
    for entry in steps:
        entry["accuracy_delta"] = round(entry["accuracy"] - baseline["accuracy"], 4)
        entry["size_ratio"] = round(baseline["size_bytes"] / entry["size_bytes"], 2)
        entry["speedup_batch1"] = round(baseline["latency_ms_p50"] / entry["latency_ms_p50"], 2)
        entry["speedup_batch64"] = round(
            baseline["latency_ms_p50_batch64"] / entry["latency_ms_p50_batch64"], 2
        )
    engines = []
    if recipe.engines:
        progress("timing the final float model on every engine")
        engines = compare(current, split.x_test, recipe.latency_runs)
    return {
        "task": recipe.task,
        "recipe": recipe.model_dump(),
        "machine": {"onnxruntime": ort.__version__},
        "baseline": baseline,
        "steps": steps[1:],
        "final": steps[-1],
        "engines": engines,
        **({"budget": searched} if searched is not None else {}),
    }


def _budget(
    recipe: DigitsRecipe,
    root: Path,
    split: digits.Split,
    starts: Sequence[tuple[str, Sequence[DenseLayer]]],
    max_drop: float,
    progress: Progress,
) -> dict[str, Any]:
    prunes = [s for s in recipe.steps if isinstance(s, Prune)]
    factors = [s for s in recipe.steps if isinstance(s, LowRank)]
    progress("budget: per-layer sensitivity")
    layers = starts[-1][1]
    table = budget.sensitivity(layers, split, prunes[0] if prunes else None, factors[0] if factors else None)
    model = root / "budget" / "model.onnx"
    found = budget.search(
        recipe,
        split,
        starts,
        max_drop,
        model,
        apply=lambda step, current: apply(step, current, split, recipe.seed)[0],
        quantize_to=lambda step, current, target: quantize_to(step, current, split, recipe.seed, target)[0],
        measure=lambda path, reference: measure(path, split, recipe.latency_runs, reference),
        progress=progress,
    )
    if found["chosen"] is not None:
        _package(root, "budget", model, {"step": "budget", **found["chosen"]})
    return {**found, "sensitivity": table, "sensitivity_of": starts[-1][0]}
