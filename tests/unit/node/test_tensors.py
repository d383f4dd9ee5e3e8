from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgegen.errors import InvalidInput
from edgegen.node.tensors import to_batch
from edgegen.store import TensorSpec

SPEC = TensorSpec(name="input", dtype="float32", shape=(-1, 4))


def test_one_sample_gets_a_batch_dimension_and_a_list_of_samples_keeps_it() -> None:
    assert to_batch([1, 2, 3, 4], SPEC).shape == (1, 4)
    assert to_batch([[1, 2, 3, 4], [5, 6, 7, 8]], SPEC).shape == (2, 4)
    assert to_batch([1, 2, 3, 4], SPEC).dtype == np.float32


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2, 3], "shape"),
        ([[1, 2], [3, 4]], "shape"),
        ([[[1, 2, 3, 4]]], "shape"),
        ([], "shape"),
        (5, "shape"),
        (["1", "2", "3", "4"], "numbers"),
        ([1, 2, "x", 4], "numbers"),
        ([True, False, True, False], "numbers"),
        ([None, 1, 2, 3], "numbers"),
        ([{"a": 1}, 1, 2, 3], "numbers"),
        ([[1, 2, 3, 4], [1, 2]], "rectangular"),
        ([1e39, 0, 0, 0], "finite"),
        ([-1e39, 0, 0, 0], "finite"),
        ("1234", "numbers"),
        ({"x": 1}, "numbers"),
    ],
)
def test_bad_input_data_is_refused_with_a_reason(data: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        to_batch(data, SPEC)


def test_integer_models_refuse_fractions_and_out_of_range_values() -> None:
    spec = TensorSpec(name="ids", dtype="int8", shape=(-1, 2))
    assert to_batch([1, 2], spec).dtype == np.int8
    with pytest.raises(InvalidInput, match="integers"):
        to_batch([1.5, 2], spec)
    with pytest.raises(InvalidInput, match="range"):
        to_batch([1000, 2], spec)
