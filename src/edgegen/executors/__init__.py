"""One forward pass per model format, behind the `Executor` protocol.

Each format's module imports its runtime, so a node only pays for the runtimes its models use.
"""

from __future__ import annotations

from pathlib import Path

from edgegen.config import LlmSettings, Settings
from edgegen.errors import ExecutorError
from edgegen.executors.base import Executor, LlmExecutor
from edgegen.store.manifest import Format, TensorSpec

__all__ = ["Executor", "LlmExecutor", "describe_model", "load_executor", "load_llm"]


def load_llm(path: Path, settings: LlmSettings) -> LlmExecutor:
    """Load a GGUF language model with llama.cpp (imported here: nodes without LLMs never load it).

    The file is checked by our own GGUF reader first: llama.cpp must never parse a malformed file.
    """
    from edgegen.executors.llamacpp import LlamaExecutor
    from edgegen.store.gguf import read_gguf

    read_gguf(path)
    return LlamaExecutor(path, settings)


def load_executor(path: Path, fmt: Format, settings: Settings | None = None) -> Executor:
    """Load a model file with the runtime of its format."""
    settings = settings or Settings()
    if fmt == "onnx":
        from edgegen.executors.onnx import OnnxExecutor

        return OnnxExecutor(path, settings.onnx)
    if fmt == "tflite":
        from edgegen.executors.tflite import TFLiteExecutor

        return TFLiteExecutor(path, settings.tflite)
    raise ExecutorError(f"no fixed-shape executor for format {fmt!r}")


def describe_model(path: Path, fmt: Format) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Read a model file's input and output tensors (by loading it once; a GGUF by reading its header)."""
    if fmt == "gguf":
        from edgegen.store.gguf import describe

        inputs, outputs, _ = describe(path)
        return inputs, outputs
    executor = load_executor(path, fmt)
    try:
        return list(executor.inputs), list(executor.outputs)
    finally:
        executor.close()
