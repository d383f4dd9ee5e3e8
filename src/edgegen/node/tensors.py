"""Strict conversion of JSON values into the tensors a model declares.

`json.loads` in the seed app accepts NaN and Infinity and numpy happily turns "1.5" into 1.5; here a
tensor holds numbers of the model's dtype and nothing else, or the request is refused with a message
saying what was wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgegen.errors import InvalidInput
from edgegen.store.manifest import TensorSpec


def _numbers(data: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"{what} must be a rectangular nested list of numbers") from None
    if array.dtype.kind not in "iuf":
        raise InvalidInput(f"{what} must be a rectangular nested list of numbers")
    return array


def cast(array: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Cast numbers to the model's dtype, refusing values the dtype cannot hold."""
    if dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            out = array.astype(dtype)
        if not np.isfinite(out).all():
            raise InvalidInput(f"{what} holds a value that is not a finite {dtype.name} number")
        return out
    if dtype.kind in "iu":
        if array.dtype.kind == "f":
            raise InvalidInput(f"{what} must hold integers for this model ({dtype.name})")
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InvalidInput(f"{what} holds a value outside the range of {dtype.name}")
        return array.astype(dtype)
    raise InvalidInput(f"this model's input dtype {dtype.name} is not supported here")


def _fits(shape: tuple[int, ...], spec: tuple[int, ...]) -> bool:
    return len(shape) == len(spec) and all(d == s or s == -1 for d, s in zip(shape, spec, strict=True))


def to_batch(data: Any, spec: TensorSpec, what: str = "input_data") -> np.ndarray:
    """One sample (the model's shape without the batch dimension) or a list of samples -> (B, ...).

    >>> spec = TensorSpec(name="x", dtype="float32", shape=(-1, 2))
    >>> to_batch([1, 2], spec).shape, to_batch([[1, 2], [3, 4]], spec).shape
    ((1, 2), (2, 2))
    """
    array = cast(_numbers(data, what), np.dtype(spec.dtype), what)
    sample = spec.shape[1:]
    if _fits(array.shape, sample) and array.size > 0:
        return array.reshape((1, *array.shape))
    if _fits(array.shape, spec.shape) and array.shape[0] > 0 and array.size > 0:
        return array
    expected = (
        "(" + ", ".join("N" if d == -1 else str(d) for d in sample) + ("," if len(sample) == 1 else "") + ")"
    )
    raise InvalidInput(
        f"{what} has shape {tuple(array.shape)}; expected {expected} for one sample or a list of such samples"
    )
