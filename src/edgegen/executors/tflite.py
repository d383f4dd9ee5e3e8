"""TFLite (LiteRT) executor over `ai-edge-litert`.

A LiteRT interpreter holds its tensors in place: it is not safe to share between threads, and the
arrays `tensor()` hands out are views that the next `invoke()` overwrites — the seed app's wrong answers
under concurrency come from exactly that. Here the engine never enters `run` twice at once, and
outputs are copied out (`get_tensor`) before the next batch can touch them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from edgegen.config import TFLiteSettings
from edgegen.errors import ExecutorError
from edgegen.store.manifest import TensorSpec


def _spec(detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(
        name=detail["name"], dtype=np.dtype(detail["dtype"]).name, shape=tuple(int(d) for d in shape)
    )


class TFLiteExecutor:
    def __init__(self, path: Path, settings: TFLiteSettings | None = None) -> None:
        settings = settings or TFLiteSettings()
        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=settings.threads)
            self._interpreter.allocate_tensors()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError with internal paths inside
            raise ExecutorError(f"LiteRT could not load the model: {type(exc).__name__}") from exc
        in_details = self._interpreter.get_input_details()
        out_details = self._interpreter.get_output_details()
        self.inputs = [_spec(d) for d in in_details]
        self.outputs = [_spec(d) for d in out_details]
        self._in_index = {d["name"]: d["index"] for d in in_details}
        self._out_index = {d["name"]: d["index"] for d in out_details}
        self._shapes = {d["name"]: tuple(int(x) for x in d["shape"]) for d in in_details}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        resized = False
        for name, array in feeds.items():
            if array.shape != self._shapes[name]:
                # Resizing re-plans the tensor arena; it only happens when the batch size changes.
                self._interpreter.resize_tensor_input(self._in_index[name], list(array.shape), strict=True)
                self._shapes[name] = array.shape
                resized = True
        if resized:
            self._interpreter.allocate_tensors()
        for name, array in feeds.items():
            self._interpreter.set_tensor(self._in_index[name], array)
        self._interpreter.invoke()
        return {name: self._interpreter.get_tensor(index) for name, index in self._out_index.items()}

    def close(self) -> None:
        del self._interpreter
