"""ONNX Runtime executor.

Graph optimizations (constant folding, Gemm+Relu and other operator fusions, layout changes) are on
at level `all` by default: that is where the seed's "operator fusion" happens. The memory arena and
memory-pattern planning reuse buffers across runs of the same shape instead of allocating per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgegen.config import OnnxSettings
from edgegen.errors import ExecutorError
from edgegen.store.manifest import TensorSpec

# ONNX Runtime's type strings -> numpy dtype names.
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _spec(arg: ort.NodeArg) -> TensorSpec:
    dtype = ORT_TYPES.get(arg.type)
    if dtype is None:
        raise ExecutorError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    # Symbolic or unknown dimensions ("batch", None) take any size.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


class OnnxExecutor:
    def __init__(self, path: Path, settings: OnnxSettings | None = None) -> None:
        settings = settings or OnnxSettings()
        options = ort.SessionOptions()
        options.graph_optimization_level = LEVELS[settings.graph_optimization]
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_cpu_mem_arena = settings.memory_arena
        options.enable_mem_pattern = settings.memory_pattern
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped errors for any bad file
            raise ExecutorError(f"ONNX Runtime could not load the model: {type(exc).__name__}") from exc
        self.inputs = [_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_spec(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        del self._session
