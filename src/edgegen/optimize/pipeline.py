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
import statistics
import time
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
from edgegen.optimize import digits, lm_task, plots, report
from edgegen.optimize.engines import compare
from edgegen.optimize.layers import DenseLayer, mlp_forward
from edgegen.optimize.onnx_export import mlp_to_onnx
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
from edgegen.store.manifest import Manifest, sha256_file

Progress = Callable[[str], None]
INPUTS, CLASSES = 64, 10


def measure(model: Path, split: digits.Split, runs: int, reference: Sequence[DenseLayer]) -> dict[str, Any]:
    """Size, latency and accuracy of an exported model, and its parity with the float layers it came from."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: split.x_test})[0]
    accuracy = float((logits.argmax(1) == split.y_test).mean())
    # Export parity for a float package; for an int8 one, the error quantization added.
    max_abs_error = float(np.abs(logits - mlp_forward(reference, split.x_test)).max())

    def p50_ms(batch: np.ndarray) -> float:
        for _ in range(10):
            session.run(None, {name: batch})
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, {name: batch})
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1000, 4)

    return {
        "max_abs_error": round(max_abs_error, 6),
        "size_bytes": model.stat().st_size,
        # What a package costs to ship: sharing and sparsity show here, not in the dense file.
        "compressed_bytes": len(zlib.compress(model.read_bytes(), 9)),
        "latency_ms_p50": p50_ms(split.x_test[:1]),
        "latency_ms_p50_batch64": p50_ms(np.resize(split.x_test, (64, INPUTS))),
        "accuracy": round(accuracy, 4),
    }


def _params(layers: Sequence[DenseLayer]) -> tuple[int, int]:
    """Parameters (and non-zero ones); a weight matrix tied across layers counts once."""
    weights = list({id(layer.weight): layer.weight for layer in layers}.values())
    biases = sum(layer.bias.size for layer in layers)
    return sum(w.size for w in weights) + biases, sum(int(np.count_nonzero(w)) for w in weights) + biases


def _package(root: Path, folder: str, model: Path, facts: dict[str, Any]) -> None:
    """Turn `root/folder/model.onnx` into a store package with its facts in the manifest."""
    inputs, outputs = describe_model(model, "onnx")
    manifest = Manifest(
        name=f"digits-{folder.split('-', 1)[1]}",
        version="1",
        format="onnx",
        inputs=inputs,
        outputs=outputs,
        files={"model.onnx": sha256_file(model)},
        producer=f"edgegen {__version__} optimize",
        metadata=facts,
    )
    manifest.write(root / folder / "manifest.json")


def run(recipe: DigitsRecipe | LmRecipe, out: Path, progress: Progress = lambda _: None) -> dict[str, Any]:
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another --out")
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        if isinstance(recipe, LmRecipe):
            result = lm_task.run(recipe, staging, progress)
        else:
            result = _run(recipe, staging, progress)
        (staging / "report.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        (staging / "report.md").write_text(report.markdown(result), encoding="utf-8")
        plots.plot(result, staging)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _run(recipe: DigitsRecipe, root: Path, progress: Progress) -> dict[str, Any]:
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
        elif isinstance(step, Prune):
            progress(f"step {index}: prune {step.method} {step.amount:.0%}")
            if step.method == "neurons":
                done = prune_neurons(current, step.amount)
            else:
                done = prune_unstructured(current, step.amount, method=step.method, scope=step.scope,
                                          seed=recipe.seed)  # fmt: skip
            current = done.layers
            if step.finetune_epochs:
                current = train(current, split.x_train, split.y_train, epochs=step.finetune_epochs,
                                seed=recipe.seed, keep_zeros=step.method != "neurons")  # fmt: skip
            detail = {**done.detail, "amount": step.amount, "finetune_epochs": step.finetune_epochs}
        elif isinstance(step, LowRank):
            progress(f"step {index}: low-rank")
            try:
                done = low_rank(current, rank=step.rank, energy=step.energy)
            except ValueError as exc:
                raise ConfigError(f"step {index} (lowrank): {exc}") from None
            current = done.layers
            if step.finetune_epochs:
                current = train(
                    current, split.x_train, split.y_train, epochs=step.finetune_epochs, seed=recipe.seed
                )
            detail = dict(done.detail)
        elif isinstance(step, Share) and step.method == "tie":
            progress(f"step {index}: tie same-shaped layers")
            try:
                done = tie_layers(current)
            except ValueError as exc:
                raise ConfigError(f"step {index} (share): {exc}") from None
            current = done.layers
            if step.finetune_epochs:
                current = train(
                    current, split.x_train, split.y_train, epochs=step.finetune_epochs, seed=recipe.seed
                )
            detail = {**done.detail, "method": "tie", "finetune_epochs": step.finetune_epochs}
        elif isinstance(step, Share):
            progress(f"step {index}: share weights ({step.clusters} values per layer)")
            done = share_weights(current, step.clusters)
            current = done.layers
            detail = {**done.detail, "method": "cluster"}
        elif isinstance(step, Quantize):
            progress(f"step {index}: quantize {step.mode}")
            detail = {"mode": step.mode}
            quantized = current
            if step.mode == "qat":
                # Fine-tune a copy through int8 rounding; ONNX Runtime's static QDQ then converts it.
                quantized = train(current, split.x_train, split.y_train, epochs=step.epochs,
                                  seed=recipe.seed, fake_quant=True)  # fmt: skip
                detail["epochs"] = step.epochs
            source = export(index, f"float-{step.mode}", quantized)
            folder = root / f"{index:02d}-int8-{step.mode}"
            folder.mkdir()
            quantize(source, folder / "model.onnx", "dynamic" if step.mode == "dynamic" else "static",
                     calibration=split.x_train[: step.calibration_samples])  # fmt: skip
            shutil.rmtree(source.parent)
            emit(index, f"int8-{step.mode}", quantized, folder / "model.onnx", detail)
            continue
        emit(index, step.kind, current, export(index, step.kind, current), detail)
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
    }
