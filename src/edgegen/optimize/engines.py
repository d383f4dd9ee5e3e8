"""The seed's §3.1 by measurement: run one model on every engine that installs here, at batch 1 and 64.

Engines: ONNX Runtime (graph optimizations on), LiteRT (our TFLite export, XNNPACK), OpenVINO (the ONNX
export, CPU plugin, f32: its default on CPUs with bf16 units rounds to bf16, which changes the answers),
PyTorch eager and `torch.compile` (inductor, CPU). All single-threaded, same inputs, median of `runs`
calls; each engine's outputs are checked against the numpy reference before it is timed, so a fast wrong
engine cannot win.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import torch

from edgegen.modelkit.layers import DenseLayer, mlp_forward
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.modelkit.tflite_writer import mlp_to_tflite
from edgegen.optimize.train import to_torch

Runner = Callable[[np.ndarray], np.ndarray]


def p50_ms(run: Runner, batch: np.ndarray, runs: int) -> float:
    for _ in range(10):
        run(batch)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 4)


def onnxruntime_runner(model: bytes) -> Runner:
    """One intra-op thread, default graph optimizations; warnings (an int8 graph's) silenced."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def litert_runner(model: bytes) -> Runner:
    """One thread (XNNPACK); the input is resized, and the arena reallocated, when the batch changes."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=1)
    shape: list[tuple[int, ...]] = [()]
    index_in = interpreter.get_input_details()[0]["index"]
    index_out = interpreter.get_output_details()[0]["index"]

    def run(x: np.ndarray) -> np.ndarray:
        if shape[0] != x.shape:
            interpreter.resize_tensor_input(index_in, list(x.shape))
            interpreter.allocate_tensors()
            shape[0] = x.shape
        interpreter.set_tensor(index_in, x)
        interpreter.invoke()
        return cast(np.ndarray, interpreter.get_tensor(index_out))  # LiteRT ships no types

    return run


def openvino_runner(model: bytes) -> Runner:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    request = core.compile_model(core.read_model(model), "CPU", config).create_infer_request()
    return lambda x: request.infer({0: x})[0]


def _torch(layers: Sequence[DenseLayer], compiled: bool) -> Runner:
    torch.set_num_threads(1)
    model = to_torch(layers).eval()
    module = torch.compile(model) if compiled else model

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits: torch.Tensor = module(torch.from_numpy(x))  # (a compiled module's call is untyped)
            return logits.numpy()

    return run


def compare(layers: Sequence[DenseLayer], x: np.ndarray, runs: int = 200) -> list[dict[str, Any]]:
    """Latency of each engine on `layers`; one that fails to build or disagrees is reported, not timed."""
    batches = {"latency_ms_p50": x[:1], "latency_ms_p50_batch64": np.resize(x, (64, x.shape[1]))}
    reference = mlp_forward(layers, batches["latency_ms_p50_batch64"])
    results: list[dict[str, Any]] = []
    builders: dict[str, Callable[[], Runner]] = {
        "onnxruntime": lambda: onnxruntime_runner(mlp_to_onnx(layers)),
        "litert": lambda: litert_runner(mlp_to_tflite(layers)),
        "openvino": lambda: openvino_runner(mlp_to_onnx(layers)),
        "torch-eager": lambda: _torch(layers, compiled=False),
        "torch-compile": lambda: _torch(layers, compiled=True),
    }
    for name, build in builders.items():
        entry: dict[str, Any] = {"engine": name}
        try:
            run = build()
            error = float(np.abs(run(batches["latency_ms_p50_batch64"]) - reference).max())
            entry["max_abs_error"] = round(error, 7)
            if error > 1e-3:
                entry["status"] = "wrong outputs"
            else:
                entry.update({key: p50_ms(run, batch, runs) for key, batch in batches.items()})
                entry["status"] = "ok"
        except Exception as exc:  # an engine that does not work here is a finding, not a crash
            entry["status"] = f"unavailable: {type(exc).__name__}"
        results.append(entry)
    return results
