"""Budget mode (`--max-accuracy-drop X`): search the recipe's options, keep the fastest package within X.

The search space comes from the recipe itself:

    start      the teacher, or the distilled student (when the recipe distils)
    prune      skipped, or each prune step's method at ½×, 1× and 1.5× its amount (below 0.95)
    lowrank    skipped, or the step's rank at ½×, 1×, 2× (energy: 0.05 looser, as given, 0.03 tighter)
    quantize   float, or each quantization mode the recipe lists

Every combination is built (shared prefixes once), scored on the test split and timed with ONNX
Runtime (batch 1 and 64); the fastest at batch 1 among those within the budget is written as the
`budget` package. Weight clustering and tying are not searched: on a dense runtime they change size,
not speed. Before the search, per-layer sensitivity shows the accuracy each layer loses when only it
is pruned, factored or quantized — why a combination costs what it costs.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgegen.modelkit.layers import DenseLayer, mlp_forward
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.optimize import digits
from edgegen.optimize.recipe import DigitsRecipe, LowRank, Prune, Quantize
from edgegen.optimize.transforms import low_rank, prune_neurons, prune_unstructured

Progress = Callable[[str], None]
Stage = list[tuple[str, Prune | LowRank | None]]


def accuracy(layers: Sequence[DenseLayer], split: digits.Split) -> float:
    return float((mlp_forward(layers, split.x_test).argmax(1) == split.y_test).mean())


def _int8(x: np.ndarray, low: float, high: float, symmetric: bool) -> np.ndarray:
    """Round to int8 and back: symmetric ±127 over max|x|, or asymmetric over [low, high]."""
    if symmetric:
        scale = max(float(np.abs(x).max()), 1e-8) / 127
        return (np.clip(np.round(x / scale), -127, 127) * scale).astype(np.float32)
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-8) / 255
    zero = round(-128 - low / scale)
    return ((np.clip(np.round(x / scale) + zero, -128, 127) - zero) * scale).astype(np.float32)


def _quantized_layer_accuracy(layers: Sequence[DenseLayer], i: int, split: digits.Split) -> float:
    """Accuracy with only layer i in int8 (weights per tensor; its input over the calibration range)."""
    x_cal, x = split.x_train, split.x_test
    head = list(layers[:i])
    seen = mlp_forward(head, x_cal) if head else x_cal
    inputs = mlp_forward(head, x) if head else x
    layer = replace(layers[i], weight=_int8(layers[i].weight, 0, 0, symmetric=True))
    inputs = _int8(inputs, float(seen.min()), float(seen.max()), symmetric=False)
    out = mlp_forward([layer, *layers[i + 1 :]], inputs)
    return float((out.argmax(1) == split.y_test).mean())


def sensitivity(
    layers: Sequence[DenseLayer], split: digits.Split, prune: Prune | None, factor: LowRank | None
) -> list[dict[str, Any]]:
    """Accuracy drop (points) when only one layer is pruned, factored or quantized; no fine-tuning."""
    base = accuracy(layers, split)
    prune = prune or Prune(kind="prune", amount=0.5)
    factor = factor or LowRank(kind="lowrank", energy=0.9)
    rows = []
    for i, layer in enumerate(layers):
        row: dict[str, Any] = {"layer": i, "shape": list(layer.weight.shape)}
        if prune.method == "neurons":
            # Removing layer i's output neurons also removes the next layer's inputs: the pair changes.
            if i + 1 < len(layers):
                pair = prune_neurons(layers[i : i + 2], prune.amount).layers
                row["prune"] = accuracy([*layers[:i], *pair, *layers[i + 2 :]], split)
        else:
            one = prune_unstructured([layer], prune.amount, method=prune.method).layers
            row["prune"] = accuracy([*layers[:i], *one, *layers[i + 1 :]], split)
        try:
            factored = low_rank([layer], rank=factor.rank, energy=factor.energy).layers
            row["lowrank"] = accuracy([*layers[:i], *factored, *layers[i + 1 :]], split)
        except ValueError:
            pass  # a rank larger than this layer: the search skips it too
        row["int8"] = _quantized_layer_accuracy(layers, i, split)
        for key in ("prune", "lowrank", "int8"):
            if key in row:
                row[f"{key}_drop"] = round(100 * (base - row.pop(key)), 2)
        rows.append(row)
    return rows


def _stages(recipe: DigitsRecipe) -> list[Stage]:
    stages: list[Stage] = []
    for step in recipe.steps:
        if isinstance(step, Prune):
            amounts = sorted({round(min(step.amount * k, 0.95), 3) for k in (0.5, 1.0, 1.5)})
            stages.append([
                ("", None),
                *((f"prune {step.method} {a:g}", step.model_copy(update={"amount": a})) for a in amounts),
            ])  # fmt: skip
        elif isinstance(step, LowRank):
            if step.rank is not None:
                options = [step.model_copy(update={"rank": max(1, int(step.rank * k))}) for k in (0.5, 1, 2)]
                labels = [f"lowrank rank {o.rank}" for o in options]
            else:
                assert step.energy is not None
                energies = [max(step.energy - 0.05, 0.5), step.energy, min(step.energy + 0.03, 0.999)]
                options = [step.model_copy(update={"energy": e}) for e in energies]
                labels = [f"lowrank energy {o.energy:g}" for o in options]
            stages.append([("", None), *zip(labels, options, strict=True)])
    return stages


def search(
    recipe: DigitsRecipe,
    split: digits.Split,
    starts: Sequence[tuple[str, Sequence[DenseLayer]]],
    max_drop: float,
    target: Path,
    apply: Callable[[Prune | LowRank, Sequence[DenseLayer]], list[DenseLayer]],
    quantize_to: Callable[[Quantize, Sequence[DenseLayer], Path], Sequence[DenseLayer]],
    measure: Callable[[Path, Sequence[DenseLayer]], dict[str, Any]],
    progress: Progress,
) -> dict[str, Any]:
    """Build every combination, time those within the budget, write the fastest to `target`."""
    floor = accuracy(starts[0][1], split) - max_drop / 100
    modes = [None, *(s for s in recipe.steps if isinstance(s, Quantize))]
    candidates: list[dict[str, Any]] = []
    best: tuple[float, bytes] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.onnx"
        for start, layers in starts:
            paths: list[tuple[list[str], Sequence[DenseLayer]]] = [([start], layers)]
            for stage in _stages(recipe):
                grown = []
                for (names, current), (label, step) in itertools.product(paths, stage):
                    if step is None:
                        grown.append((names, current))
                        continue
                    try:
                        grown.append(([*names, label], apply(step, current)))
                    except ValueError:
                        continue  # this option does not fit this model (a rank too large)
                paths = grown
            for (names, current), mode in itertools.product(paths, modes):
                name = " → ".join([*names, f"int8-{mode.mode}" if mode else "float"])
                progress(f"budget: {name}")
                if mode is None:
                    model.write_bytes(mlp_to_onnx(current))
                    reference = current
                else:
                    reference = quantize_to(mode, current, model)
                entry: dict[str, Any] = {"candidate": name}
                figures = measure(model, reference)
                entry.update({k: figures[k] for k in ("accuracy", "size_bytes", "latency_ms_p50",
                                                      "latency_ms_p50_batch64")})  # fmt: skip
                entry["within"] = entry["accuracy"] >= floor - 1e-9
                candidates.append(entry)
                if entry["within"] and (best is None or entry["latency_ms_p50"] < best[0]):
                    best = (entry["latency_ms_p50"], model.read_bytes())
    chosen = None
    if best is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(best[1])
        chosen = min((c for c in candidates if c["within"]), key=lambda c: c["latency_ms_p50"])
    return {
        "max_accuracy_drop": max_drop,
        "accuracy_floor": round(floor, 4),
        "candidates": candidates,
        "chosen": chosen,
    }
