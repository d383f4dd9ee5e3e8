from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgegen.config import OnnxSettings, Settings
from edgegen.errors import ExecutorError
from edgegen.executors import describe_model, load_executor
from edgegen.modelkit.layers import DenseLayer, mlp_forward


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_executor_matches_the_numpy_reference(
    fmt: str, model_files: dict[str, Path], tiny_layers: list[DenseLayer]
) -> None:
    executor = load_executor(model_files[fmt], fmt)
    x = np.random.default_rng(1).uniform(0, 16, (5, 64)).astype(np.float32)
    for batch in (x[:1], x, x[:2]):  # batch size changes resize the LiteRT arena
        got = executor.run({"input": batch})["logits"]
        np.testing.assert_allclose(got, mlp_forward(tiny_layers, batch), rtol=1e-4, atol=1e-4)
    executor.close()


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_describe_reads_names_dtypes_and_dynamic_batch(fmt: str, model_files: dict[str, Path]) -> None:
    inputs, outputs = describe_model(model_files[fmt], fmt)
    assert [(s.name, s.dtype, s.shape) for s in inputs] == [("input", "float32", (-1, 64))]
    assert [(s.name, s.dtype, s.shape) for s in outputs] == [("logits", "float32", (-1, 10))]


def test_outputs_are_copies_not_views_of_the_interpreter(model_files: dict[str, Path]) -> None:
    executor = load_executor(model_files["tflite"], "tflite")
    first = executor.run({"input": np.zeros((1, 64), np.float32)})["logits"].copy()
    kept = executor.run({"input": np.zeros((1, 64), np.float32)})["logits"]
    executor.run({"input": np.full((1, 64), 16, np.float32)})
    np.testing.assert_array_equal(kept, first)  # a later run must not rewrite an earlier answer


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_corrupt_model_file_raises_executor_error(
    fmt: str, tmp_path: Path, model_files: dict[str, Path]
) -> None:
    bad = tmp_path / f"bad.{fmt}"
    bad.write_bytes(model_files[fmt].read_bytes()[:100])
    with pytest.raises(ExecutorError, match="could not load"):
        load_executor(bad, fmt)


def test_onnx_settings_are_applied(model_files: dict[str, Path]) -> None:
    settings = Settings(onnx=OnnxSettings(intra_op_threads=2, graph_optimization="basic", memory_arena=False))
    executor = load_executor(model_files["onnx"], "onnx", settings)
    options = executor._session.get_session_options()  # type: ignore[attr-defined]
    assert options.intra_op_num_threads == 2
    assert options.enable_cpu_mem_arena is False


def test_gguf_is_not_a_fixed_shape_format(model_files: dict[str, Path]) -> None:
    with pytest.raises(ExecutorError, match="gguf"):
        load_executor(model_files["onnx"], "gguf")
