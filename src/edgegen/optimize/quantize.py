"""Post-training int8 quantization of an exported ONNX model with ONNX Runtime's quantizer.

dynamic  weights int8 ahead of time, activations quantized per batch at run time (no data needed)
static   weights and activations int8 with scales calibrated on sample inputs, QDQ format
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)


class _Samples(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type information
    def __init__(self, name: str, x: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize(
    source: Path,
    target: Path,
    mode: Literal["dynamic", "static"],
    *,
    input_name: str = "input",
    calibration: np.ndarray | None = None,
) -> None:
    if mode == "static" and (calibration is None or len(calibration) == 0):
        raise ValueError("static quantization needs calibration samples")
    # The quantizer advises "pre-processing" through the root logger on every call; our graphs are
    # already shape-inferred MLPs, so the advice is noise on the command line.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        if mode == "dynamic":
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
            return
        assert calibration is not None
        quantize_static(
            source,
            target,
            _Samples(input_name, calibration.astype(np.float32)),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.setLevel(level)
